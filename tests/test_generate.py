"""`python -m tandem_jax.generate` on trained tiny workdirs: text in, text out, every method, lossless."""

import dataclasses
import json

import pytest
from absl import flags

from tandem_jax import cli
from tandem_jax import generate as gen_cli
from tandem_jax import workdir as workdir_lib

pytestmark = pytest.mark.slow  # uses the session's chain of trained tiny stages


def _run(capsys, *args, with_err=False):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["generate", *args])
  try:
    gen_cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  return (captured.out, captured.err) if with_err else captured.out


def test_generate_json_every_method_equals_ar(tiny_chain, capsys, monkeypatch):
  wd = {s: r["workdir"] for s, r in tiny_chain.items()}
  prompts = ["--prompt=We the People", "--prompt=The Congress shall", "--prompt=A"]
  common = ["--max_new_tokens=12", "--json"] + prompts
  ar = json.loads(_run(capsys, f"--workdir={wd['tandem']}", "--method=ar", *common))
  want = [o["token_ids"] for o in ar["outputs"]]
  assert all(len(w) >= 1 for w in want)
  for method, extra in (("tandem_speed", []), ("speed", [f"--drafter_workdir={wd['secondary_distil']}"]),
                        ("tandem_speed", [f"--router_workdir={wd['router']}", "--adaptive"]),
                        ("tandem_speed", [f"--router_workdir={wd['router']}", "--adaptive", "--threshold=cost"])):
    out = json.loads(_run(capsys, f"--workdir={wd['tandem']}", f"--method={method}", "--block_len=3", *extra,
                          *common))
    assert [o["token_ids"] for o in out["outputs"]] == want, (method, extra)
    assert out["outputs"][0]["text"] and out["summary"]["primary_calls"] >= 3
    assert set(out["outputs"][0]["stats"]) >= {"primary_calls", "secondary_calls", "drafted", "accepted"}
  # the router workdir alone carries its tandem, threshold and γ_max
  router_cfg = workdir_lib.load_config(wd["router"]).router
  loaded = gen_cli.load(wd["router"])
  assert (loaded.threshold, loaded.gamma_max) == (router_cfg.threshold, router_cfg.gamma_max)
  out = json.loads(_run(capsys, f"--workdir={wd['router']}", "--method=tandem_speed", "--adaptive", *common))
  assert [o["token_ids"] for o in out["outputs"]] == want
  # the router's stop by default: its cost-aware gate under the auto policy, its config's τ under fixed
  seen = []
  monkeypatch.setattr(gen_cli, "generate", lambda *a, **kw: seen.append(kw.get("threshold")))
  for policy in ("auto", "fixed"):
    loaded("tandem_speed", ["x"], adaptive=True, policy=policy)
  loaded("tandem_speed", ["x"], adaptive=True, policy="auto", threshold=0.5)
  assert seen == ["gate", router_cfg.threshold, 0.5]
  monkeypatch.undo()
  # without --block_len, γ_max is the cap the program is compiled for (K + 2 bins of emitted tokens per block)
  monkeypatch.setattr(gen_cli, "load", lambda *_: dataclasses.replace(loaded, gamma_max=2))
  out = json.loads(_run(capsys, f"--workdir={wd['router']}", "--method=tandem_speed", "--adaptive", *common))
  assert [o["token_ids"] for o in out["outputs"]] == want
  assert all(len(o["stats"]["block_hist"]) == 2 + 2 for o in out["outputs"])
  monkeypatch.undo()
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
  assert "speedup over ar" in text and "block length γ per iteration: " in text  # the auto policy's choices
  fixed = _run(capsys, f"--workdir={wd}", "--method=tandem_speed", "--prompt=We", "--max_new_tokens=8",
               "--policy=fixed", "--block_len=2")
  assert "block length γ per iteration: 2: " in fixed


def _run_error(capsys, *args) -> str:
  """Runs the CLI's main as `python -m tandem_jax.generate` does; returns the one line it prints (exit code 2)."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["generate", *args])
  try:
    with pytest.raises(SystemExit) as e:
      cli.wrap(gen_cli.main, "generate", reads_workdir=True)([])
  finally:
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
  return err


def test_generate_errors(tiny_chain, capsys):
  wd = tiny_chain["primary"]["workdir"]
  tandem = tiny_chain["tandem"]["workdir"]
  assert "needs ['tandem']" in _run_error(capsys, f"--workdir={wd}", "--method=tandem_speed", "--prompt=x")
  assert "--adaptive needs a trained router" in _run_error(capsys, f"--workdir={tandem}", "--method=tandem_speed",
                                                           "--adaptive", "--prompt=x")
  assert "--drafter_workdir does not apply to --method=tandem_speed" in _run_error(
      capsys, f"--workdir={tandem}", f"--drafter_workdir={wd}", "--prompt=x")
  assert "--show_drafts does not apply to --method=ar" in _run_error(capsys, f"--workdir={wd}", "--method=ar",
                                                                     "--show_drafts", "--prompt=x")
  assert "--repeats applies only with --compare_ar" in _run_error(capsys, f"--workdir={tandem}", "--repeats=2",
                                                                  "--prompt=x")
  assert "--stream and --json" in _run_error(capsys, f"--workdir={tandem}", "--stream", "--json", "--prompt=x")
  assert "--interactive reads the prompts from stdin" in _run_error(capsys, f"--workdir={tandem}", "--interactive",
                                                                    "--prompt=x")
  assert "give at least one --prompt" in _run_error(capsys, f"--workdir={tandem}")
  assert "max_seq_len" in _run_error(capsys, f"--workdir={tandem}", "--prompt=x", "--max_new_tokens=100000")
  for bad in ("2", "often"):
    assert "must be a number in [0, 1], 'cost' or 'gate'" in _run_error(
        capsys, f"--workdir={tiny_chain['router']['workdir']}", "--adaptive", f"--threshold={bad}", "--prompt=x")


def test_empty_prompt_says_it_generates_from_bos(tiny_chain, capsys):
  out, err = _run(capsys, f"--workdir={tiny_chain['primary']['workdir']}", "--method=ar", "--prompt=",
                  "--max_new_tokens=4", "--json", with_err=True)
  assert len(json.loads(out)["outputs"][0]["token_ids"]) >= 1
  assert "note: prompt 0 is empty: generating from BOS alone" in err


def test_stream_prints_the_final_tokens(tiny_chain, capsys):
  wd = tiny_chain["tandem"]["workdir"]
  # sampled: the fixed policy, so both runs draw the same random numbers (auto's γ follows a per-process calibration)
  for method, extra in (("tandem_speed", ["--block_len=3"]), ("ar", []),
                        ("tandem_speed", ["--temperature=1", "--policy=fixed"])):
    text = _run(capsys, f"--workdir={wd}", f"--method={method}", "--prompt=We the People", "--max_new_tokens=12",
                "--stream", *extra)
    final = json.loads(_run(capsys, f"--workdir={wd}", f"--method={method}", "--prompt=We the People",
                            "--max_new_tokens=12", "--json", *extra))["outputs"][0]["text"]
    streamed = text.split("> We the People\n", 1)[1].split("\n\n[")[0]
    assert streamed == final, (method, streamed, final)
  rows = _run(capsys, f"--workdir={wd}", "--prompt=We", "--prompt=The Congress", "--max_new_tokens=8", "--stream")
  assert "[0] +" in rows and "[1] +" in rows


def test_interactive_reads_stdin_until_eof(tiny_chain, capsys, monkeypatch):
  import io
  wd = tiny_chain["tandem"]["workdir"]
  monkeypatch.setattr("sys.stdin", io.StringIO("We the People\n\nThe Congress shall\n"))
  text = _run(capsys, f"--workdir={wd}", "--method=tandem_speed", "--interactive", "--max_new_tokens=8",
              "--compare_ar", "--stream")
  stats = [line for line in text.splitlines() if line.startswith("[tandem_speed]")]
  assert len(stats) == 2, text  # one reply per non-empty line
  assert all("tokens/call" in s and "speedup" in s and "OUTPUTS DIFFER" not in s for s in stats)
  monkeypatch.setattr("sys.stdin", io.StringIO("We the People\n"))
  plain = _run(capsys, f"--workdir={wd}", "--method=ar", "--interactive", "--max_new_tokens=8")
  want = json.loads(_run(capsys, f"--workdir={wd}", "--method=ar", "--prompt=We the People", "--max_new_tokens=8",
                         "--json"))["outputs"][0]["text"]
  assert want in plain.splitlines()
