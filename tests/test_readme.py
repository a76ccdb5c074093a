"""The README's Python API example runs as written."""

import os
import re


def test_readme_python_blocks_run():
  path = os.path.join(os.path.dirname(__file__), "..", "README.md")
  blocks = re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
  assert blocks
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})
