"""The files latentdiff ships besides its code: the model presets and the bundled demo model.

One copy of each lives in the repository's top-level folders, where users find them: configs/presets/
and weights/demo/. A wheel (`pip install .`) carries those same files inside the package, as
latentdiff/presets/ and latentdiff/demo/ (pyproject.toml maps the folders there). So the package's own
copy is used when it has one (an installed wheel), and the repository's folders otherwise (a checkout run
in place, or an editable install). pip installs wheels unpacked, so both are plain paths on disk.
"""

from importlib.resources import files
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def _shipped(packaged: str, in_repository: str) -> Path:
    folder = files(__package__) / packaged
    return Path(str(folder)) if folder.is_dir() else REPOSITORY / in_repository


def preset_dir() -> Path:
    """The folder of model architecture presets, NAME.json each."""
    return _shipped("presets", "configs/presets")


def demo_model() -> Path:
    """The bundled demo model's single file."""
    return _shipped("demo", "weights/demo") / "model.safetensors"
