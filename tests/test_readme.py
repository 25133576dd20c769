"""The README's Python example runs as pasted: from the repository root and from any other folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def readme_example() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_readme_python_example_runs_as_pasted(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    made = cwd / "circle.png"
    assert not made.exists(), f"{made} is in the way of the example: remove it"
    try:
        proc = subprocess.run([sys.executable, "-c", readme_example()], cwd=cwd, env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert made.stat().st_size > 0
        assert "Steps: 10" in proc.stdout and "Seed: 3" in proc.stdout  # the printed infotext of image 0
    finally:
        made.unlink(missing_ok=True)
