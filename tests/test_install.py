"""Install and run anywhere: the wheel that `pip install .` builds carries everything the `latentdiff`
command needs (code, tokenizer, presets, demo model), and once installed the command draws the README's
picture from an unrelated directory, offline, without the repository on its path.

The wheel is built and installed without network or build isolation (setuptools comes from the test
extra). The fresh virtual environment gets this environment's third-party packages through a .pth file
(their .pth files, such as an editable install's, are not run), so nothing is downloaded.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"
# build/ and *.egg-info are setuptools' leftovers, whose stale files could hide a package missing from the build
SKIP = {".git", "build", "__pycache__", ".pytest_cache", "outputs", "runs", ".whl"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1",
           # any HTTP(S) attempt goes to a closed port and fails at once
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def _source_ignore(folder: str, names: list[str]) -> list[str]:
    if Path(folder) == ROOT / "weights":  # users' checkpoints live there too; only the demo ships
        return [n for n in names if n not in ("README.md", "demo")]
    return [n for n in names if n in SKIP or n.endswith(".egg-info")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree as `pip install .` builds it."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_source_ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, env=os.environ | OFFLINE)
    (wheel,) = (tmp_path / "dist").glob("latentdiff-*.whl")
    return wheel


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment that sees this one's third-party packages but not the repository."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    Path(purelib, "dependencies.pth").write_text("".join(f"{p}\n" for p in ours if Path(p).is_dir()))
    return python


def test_wheel_carries_every_module_and_the_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "latentdiff").rglob("*.py")}
    missing = sorted(sources - names)
    assert not missing, (f"the wheel lacks {missing}: add their packages to [tool.setuptools] packages in "
                         "pyproject.toml")
    presets = {f"latentdiff/presets/{p.name}" for p in (ROOT / "configs" / "presets").glob("*.json")}
    data = {"latentdiff/demo/model.safetensors", "latentdiff/tokenizer/vocab.json", "latentdiff/tokenizer/merges.txt"}
    assert len(presets) >= 4 and presets | data <= names, sorted(presets | data - names)
    assert not [n for n in names if n.startswith(("configs/", "weights/", "tests/"))]  # nothing outside the package


def test_installed_wheel_runs_the_main_command_from_another_directory(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=os.environ | OFFLINE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | OFFLINE | {
        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error"}
    where = subprocess.run([str(python), "-c", "import latentdiff, latentdiff.resources as r; "
                            "print(latentdiff.__file__); print(r.demo_model())"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split("\n")
    venv = (tmp_path / "venv").resolve()
    assert Path(where[0]).resolve().is_relative_to(venv), f"latentdiff imported from {where[0]}, not the wheel"
    assert Path(where[1]).resolve().is_relative_to(venv) and Path(where[1]).is_file(), where[1]

    latentdiff = python.parent / ("latentdiff.exe" if os.name == "nt" else "latentdiff")
    run = subprocess.run([str(latentdiff), "txt2img", PROMPT], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (png,) = (elsewhere / "outputs").glob("*.png")
    assert f"saved {Path('outputs') / png.name}" in run.stdout, run.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (64, 64)  # the demo model's native size
        parameters = image.text["parameters"]
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert parameters.startswith(PROMPT + "\n") and "Steps: 20" in parameters and "Seed: " in parameters, parameters
    assert pixels.std() > 10, "a flat image"  # a drawn picture, not one colour
