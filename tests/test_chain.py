"""The one chain of training runs (training/chain.py): wiring, and a run stopped by SIGTERM stops the chain."""

import os

import pytest

from configs import base
from tandem_jax.training import chain, loop


def _configs(*names):
  return {n: base.get_config(n, "tiny") for n in names}


def test_wiring_and_missing_sources(tmp_path):
  cfgs = chain.wire(_configs("primary", "secondary", "tandem"), str(tmp_path))
  assert cfgs["tandem"].init.primary_workdir == str(tmp_path / "primary")
  assert cfgs["tandem"].init.secondary_workdir == str(tmp_path / "secondary")
  with pytest.raises(ValueError, match="'tandem_distil' is initialised from run 'tandem'"):
    chain.wire(_configs("primary", "tandem_distil"), str(tmp_path))
  with pytest.raises(ValueError, match="no chain wiring for runs \\['student'\\]"):
    chain.wire({"student": base.get_config("secondary", "tiny")}, str(tmp_path))


def test_a_run_stopped_by_sigterm_stops_the_chain(tmp_path, monkeypatch):
  """The quickstart's chain: a secondary stopped early (saved, not finished) must not seed the tandem."""
  calls = []

  def fake_train(config, workdir):
    calls.append(os.path.basename(workdir))
    return dict(step=1, eval={}, stopped_early=calls[-1] == "secondary")

  monkeypatch.setattr(loop, "train", fake_train)
  with pytest.raises(SystemExit, match="secondary stopped early at step 1"):
    chain.train_chain(_configs("primary", "secondary", "tandem"), str(tmp_path))
  assert calls == ["primary", "secondary"]
