"""TEMPORARY until the packaging branch lands."""
from pathlib import Path


def demo_model() -> Path:
    return Path(__file__).resolve().parent.parent / "weights" / "demo" / "model.safetensors"
