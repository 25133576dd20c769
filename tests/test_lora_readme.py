"""The README's add-ons example runs as pasted (its commands in a folder with the repository's tools/), and
the LoRA and embedding it makes do what the README says: the tag and the trigger word are applied and
recorded."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def addons_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Add-ons\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_readme_addons_example_runs_as_pasted(tmp_path):
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = []
    for command in addons_commands():
        args = shlex.split(command)
        if args[0] == "python":
            args[0] = sys.executable
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        outputs.append(proc.stdout)
    info = outputs[-1]  # `latentdiff info` of the image
    assert info.startswith("redcircle on a blue background <lora:demo_style:0.8>\n")
    assert re.search(r'TI hashes: "redcircle: [0-9a-f]{12}"', info)
    assert re.search(r'Lora hashes: "demo_style: [0-9a-f]{12}"', info)
