"""Tests for the optional tfds and seqio data sources; skipped unless `pip install -e .[seqio]` was run.

Both run offline: tfds through `tfds.testing.mock_data` (random text built from the dataset's feature spec in code),
seqio through a Task registered over local text files with a byte vocabulary.
"""

from __future__ import annotations

import functools
import sys
import types

import numpy as np
import pytest

from tandem_jax import data

# ----------------------------------------------------------------------------------------------------------- tfds


def test_tfds_source_reads_the_text_feature():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    train, val = data.load_documents("tfds", "lm1b", val_fraction=0.1)
    assert len(train) + len(val) == 20 and len(val) == 2
    assert all(isinstance(d, str) and d for d in train + val)
    # An explicit validation split is read instead of a hash split.
    train2, val2 = data.load_documents("tfds", "lm1b", val_split="test", max_documents=5)
    assert len(train2) == 5 and len(val2) == 5


def test_tfds_source_names_a_missing_feature():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="no feature 'body'.*text"):
      data.load_documents("tfds", "lm1b", text_field="body")


# ---------------------------------------------------------------------------------------------------------- seqio


def _lines_to_targets(dataset):
  return dataset.map(lambda line: {"targets": line})


@pytest.fixture
def seqio_task(tmp_path):
  seqio = pytest.importorskip("seqio")
  train_lines = [f"Training line number {i}, with some words." for i in range(30)]
  val_lines = ["A validation line.", "Another validation line."]
  (tmp_path / "train.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
  (tmp_path / "validation.txt").write_text("\n".join(val_lines) + "\n", encoding="utf-8")
  source = seqio.TextLineDataSource(split_to_filepattern={"train": str(tmp_path / "train.txt"),
                                                          "validation": str(tmp_path / "validation.txt")})
  features = {"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=False)}
  names = {"pretokenized": "tandem_test_text_lines", "ids_only": "tandem_test_text_lines_ids"}
  seqio.TaskRegistry.add(names["pretokenized"], source=source, output_features=features,
                         preprocessors=[_lines_to_targets, seqio.preprocessors.tokenize])
  # Without the *_pretokenized copy, the text must be decoded from the ids with the feature's vocabulary.
  seqio.TaskRegistry.add(names["ids_only"], source=source, output_features=features,
                         preprocessors=[_lines_to_targets,
                                        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)])
  yield names, train_lines, val_lines
  for name in names.values():
    seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("kind", ["pretokenized", "ids_only"])
def test_seqio_source_reads_a_registered_task(seqio_task, kind):
  names, train_lines, val_lines = seqio_task
  train, val = data.load_documents("seqio", names[kind], val_split="validation")
  assert train == train_lines and val == val_lines
  train, val = data.load_documents("seqio", names[kind], val_fraction=0.1)
  assert sorted(train + val) == sorted(train_lines) and len(val) == 3


def test_seqio_source_names_an_unknown_task():
  pytest.importorskip("seqio")
  with pytest.raises(ValueError, match="No seqio Task or Mixture named 'no_such_task'.*seqio_module"):
    data.load_documents("seqio", "no_such_task")


# ---------------------------------------------------- the adapters' plumbing, against stand-ins (always runs)


class _FakeTfds(types.ModuleType):
  """Just `load` and `as_numpy`, as `_read_tfds` uses them: examples are dicts of numpy values."""

  def __init__(self, splits):
    super().__init__("tensorflow_datasets")
    self.splits, self.calls = splits, []

  def load(self, name, split, **kwargs):
    self.calls.append((name, split, kwargs))
    return self.splits[split]

  def as_numpy(self, ds):
    return iter(ds)


def test_tfds_adapter_plumbing(monkeypatch):
  fake = _FakeTfds({"train": [{"text": b"first doc"}, {"text": np.array(b"second doc", dtype=object)},
                              {"text": b""}, {"text": "third doc"}],
                    "validation": [{"text": b"held out"}]})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  train, val = data.load_documents("tfds", "my_ds", val_split="validation", data_dir="/data")
  assert train == ["first doc", "second doc", "third doc"] and val == ["held out"]
  assert fake.calls[0] == ("my_ds", "train", {"data_dir": "/data", "shuffle_files": False, "download": False})
  assert data.load_documents("tfds", "my_ds", val_split="validation", max_documents=1)[0] == ["first doc"]
  with pytest.raises(ValueError, match="no feature 'body'"):
    data.load_documents("tfds", "my_ds", text_field="body")


class _FakeVocab:
  def decode(self, ids):
    return bytes(i - 3 for i in ids).decode("utf-8")  # seqio.ByteVocabulary's id = byte + 3.


class _FakeProvider:
  def __init__(self, examples):
    self.examples, self.kwargs = examples, None
    self.output_features = {"targets": types.SimpleNamespace(vocabulary=_FakeVocab())}

  def get_dataset(self, **kwargs):
    self.kwargs = kwargs
    return types.SimpleNamespace(as_numpy_iterator=lambda: iter(self.examples))


def test_seqio_adapter_plumbing(monkeypatch):
  ids = np.array([b + 3 for b in b"from ids"], dtype=np.int32)
  provider = _FakeProvider([{"targets": ids, "targets_pretokenized": b"raw text wins"}, {"targets": ids}])
  fake = types.ModuleType("seqio")
  fake.Mixture = type("Mixture", (), {})
  fake.get_mixture_or_task = lambda name: provider
  monkeypatch.setitem(sys.modules, "seqio", fake)
  train, val = data.load_documents("seqio", "task", val_split="validation")
  assert train == ["raw text wins", "from ids"]
  assert provider.kwargs == {"sequence_length": None, "split": "validation", "shuffle": False, "num_epochs": 1}
  with pytest.raises(ValueError, match="no output feature 'inputs'"):
    data.load_documents("seqio", "task", text_field="inputs")
