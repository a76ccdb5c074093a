"""The command lines' shared conventions (tandem_jax.cli, tandem_jax.progress): a user error is one line on stderr
and exit code 2, library INFO goes to the workdir's log file, progress lines carry rate and ETA."""

import logging
import os
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from tandem_jax import cli
from tandem_jax.progress import Progress, hms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_is_one_line_and_exit_code_2(capsys):
  def main(argv):
    raise ValueError("block_len must be >= 1, got 0\n(more detail)")

  with pytest.raises(SystemExit) as e:
    cli.wrap(main, "t", workdir_flag=None)([])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: block_len must be >= 1, got 0 (more detail)\n"

  def missing(argv):
    open("/nonexistent/file")

  with pytest.raises(SystemExit) as e:
    cli.wrap(missing, "t", workdir_flag=None)([])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")


def test_internal_error_keeps_its_traceback():
  def main(argv):
    raise RuntimeError("bug")

  with pytest.raises(RuntimeError, match="bug"):
    cli.wrap(main, "t", workdir_flag=None)([])


def test_verbosity_1_shows_the_traceback_of_a_user_error():
  def main(argv):
    raise ValueError("bad")

  flags.FLAGS["verbosity"].parse("1")
  try:
    with pytest.raises(ValueError, match="bad"):
      cli.wrap(main, "t", workdir_flag=None)([])
  finally:
    flags.FLAGS["verbosity"].unparse()
    absl_logging.set_verbosity(absl_logging.WARNING)


def test_library_info_goes_to_the_log_file_not_the_terminal(tmp_path):
  root, handler = logging.getLogger(), absl_logging.get_absl_handler()
  before = (root.level, handler.level, list(root.handlers))
  try:
    log = cli.log_file_for("unit", str(tmp_path))
    cli.configure_logging(log)
    logging.getLogger("orbax.fake").info("checkpoint manager internals")
    absl_logging.info("absl internals")
    assert handler.level == logging.WARNING  # the terminal shows WARNING and above
    for h in root.handlers:
      h.flush()
    text = open(log).read()
    assert "checkpoint manager internals" in text and "absl internals" in text
    assert log == os.path.join(str(tmp_path), "logs", "unit.log")
  finally:
    for h in root.handlers[:]:
      if h not in before[2]:
        root.removeHandler(h)
        h.close()
    root.setLevel(before[0])
    handler.setLevel(before[1])


def test_progress_lines_without_a_terminal():
  lines = []
  bar = Progress(10, "train", out=lines.append, every_s=3600)
  bar.update(1, loss=2.5)
  bar.update(5, loss=1.25)  # within every_s of the first line: not shown
  bar.update(10, loss=1.5)
  assert len(lines) == 2
  assert lines[0].startswith("[train] 1/10 steps  loss 2.5") and "ETA" in lines[0]
  assert lines[1].startswith("[train] 10/10 steps  loss 1.5") and lines[1].endswith("ETA 0:00:00")
  bar.close()
  assert len(lines) == 2  # finished: nothing more to show
  stopped = Progress(10, "x", out=lines.append, every_s=3600, start=4)
  stopped.update(5)
  stopped.close()  # ended early: its last state is shown once more
  assert lines[-1].startswith("[x] 5/10 steps")
  assert hms(3725) == "1:02:05" and hms(float("inf")) == "?"


# -- each command line, as a user runs it: one line on stderr, exit code 2 ---------------------------------------
CASES = [
    ("generate", ["--workdir=/nonexistent/run", "--prompt=x"], "error: "),
    ("generate", ["--workdir=/w", "--method=ar", "--block_len=3", "--prompt=x"],
     "error: --block_len does not apply to --method=ar"),
    ("generate", ["--workdir=/w", "--method=tandem_speed", "--threshold=0.5", "--prompt=x"],
     "error: --threshold applies only with --adaptive"),
    ("generate", ["--workdir=/w", "--method=tandem", "--policy=fixed", "--prompt=x"],
     "error: --policy does not apply to --method=tandem"),
    ("generate", ["--workdir=/w", "--nochat_template", "--prompt=x"],
     "error: --chat_template applies only with --interactive"),
    ("generate", ["--workdir=/w", "--top_k=5", "--prompt=x"],
     "error: --top_k/--top_p apply only when sampling (--temperature > 0)"),
    ("generate", ["--workdir=/w", "--block_len=abc"], "error: flag --block_len=abc: "),
    ("generate", ["--prompt=x"], "error: --workdir is required"),
    ("train", ["--config=configs/tandem.py:tiny"], "error: --workdir is required"),
    ("quickstart", ["--num_prompts=0", "--workdir=/nonexistent/q"], "error: --num_prompts must be >= 1, got 0"),
    ("quickstart", ["--block_len=0", "--workdir=/nonexistent/q"], "error: --block_len must be >= 1, got 0"),
    ("convert", ["--gguf=/nonexistent/m.gguf", "--workdir=/nonexistent/c"], "error: "),
    ("convert", ["--gguf=/nonexistent/m.gguf", "--workdir=/w", "--mesh=model=3"],
     "error: --mesh: (3,) needs 3 devices but 8 are available"),
    ("convert", ["--gguf=/nonexistent/m.gguf", "--workdir=/w", "--mesh=tensor=8"],
     "error: --mesh entries are axis=size with an axis in ['data', 'fsdp', 'model'], got 'tensor=8'"),
    ("evaluate", ["--workdir=/nonexistent/run"], "error: "),
    ("recipe", ["--primary=/nonexistent/p", "--workdir=/nonexistent/r"], "error: "),
    ("benchmark", ["--config=configs/benchmark.py:nope", "--workdir=/nonexistent/b"], "error: "),
]


@pytest.mark.parametrize("command,args,message", CASES, ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)])
def test_cli_user_errors(command, args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", f"tandem_jax.{command}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  err = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(err) == 1 and err[0].startswith(message), out.stderr[-3000:]
  assert "Traceback" not in out.stderr and out.stdout == ""
