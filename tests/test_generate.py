"""`python -m tandem_jax.generate` on trained tiny workdirs: text in, text out, every method, lossless."""

import json

import pytest
from absl import flags

from tandem_jax import generate as gen_cli

pytestmark = pytest.mark.slow  # uses the session's chain of trained tiny stages


def _run(capsys, *args):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["generate", *args])
  try:
    gen_cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().out


def test_generate_json_every_method_equals_ar(tiny_chain, capsys):
  wd = {s: r["workdir"] for s, r in tiny_chain.items()}
  prompts = ["--prompt=We the People", "--prompt=The Congress shall", "--prompt=A"]
  common = ["--max_new_tokens=12", "--json"] + prompts
  ar = json.loads(_run(capsys, f"--workdir={wd['tandem']}", "--method=ar", *common))
  want = [o["token_ids"] for o in ar["outputs"]]
  assert all(len(w) >= 1 for w in want)
  for method, extra in (("tandem_speed", []), ("speed", [f"--drafter_workdir={wd['secondary_distil']}"]),
                        ("tandem_speed", [f"--router_workdir={wd['router']}", "--adaptive"])):
    out = json.loads(_run(capsys, f"--workdir={wd['tandem']}", f"--method={method}", "--block_len=3", *extra,
                          *common))
    assert [o["token_ids"] for o in out["outputs"]] == want, (method, extra)
    assert out["outputs"][0]["text"] and out["summary"]["primary_calls"] >= 3
    assert set(out["outputs"][0]["stats"]) >= {"primary_calls", "secondary_calls", "drafted", "accepted"}
  # the router workdir alone carries its tandem, threshold and γ_max
  out = json.loads(_run(capsys, f"--workdir={wd['router']}", "--method=tandem_speed", "--adaptive", *common))
  assert [o["token_ids"] for o in out["outputs"]] == want
  out = json.loads(_run(capsys, f"--workdir={wd['llm_to_slm']}", "--method=llm_to_slm", *common))
  assert len(out["outputs"]) == 3


def test_show_drafts_and_compare(tiny_chain, capsys, tmp_path):
  wd = tiny_chain["tandem"]["workdir"]
  pf = tmp_path / "prompts.txt"
  pf.write_text("We the People\nIn the year\n")
  out = json.loads(_run(capsys, f"--workdir={wd}", "--method=tandem_speed", f"--prompts_file={pf}",
                        "--show_drafts", "--max_new_tokens=10", "--json"))
  for row in out["outputs"]:
    emitted = 1 + sum(len(b["accepted"]) + 1 for b in row["blocks"])  # + the prefill's token
    assert emitted >= len(row["token_ids"]) > 1
    assert [t for b in row["blocks"] for t in b["accepted"] + [b["primary_token"]]][:len(row["token_ids"]) - 1] == \
        row["token_ids"][1:]
    assert all(b["primary_kind"] in ("bonus", "correction") for b in row["blocks"])
  text = _run(capsys, f"--workdir={wd}", "--method=tandem_speed", "--prompt=We", "--max_new_tokens=8",
              "--compare_ar", "--repeats=1")
  assert "speedup over ar" in text


def test_generate_errors(tiny_chain, capsys):
  wd = tiny_chain["primary"]["workdir"]
  with pytest.raises(ValueError, match="needs"):
    _run(capsys, f"--workdir={wd}", "--method=tandem_speed", "--prompt=x")
  with pytest.raises(ValueError, match="router"):
    _run(capsys, f"--workdir={tiny_chain['tandem']['workdir']}", "--method=tandem_speed", "--adaptive",
         "--prompt=x")
