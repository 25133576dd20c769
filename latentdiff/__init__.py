"""latentdiff: a compact, from-scratch PyTorch implementation of Stable Diffusion."""

import importlib

from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from .errors import CheckpointError, FieldError, GenerationError, InputError, LatentDiffError, UnsupportedModelError

__version__ = "0.1.0"


# loaded on first use, so that `import latentdiff` (the CLI's start-up) does not import torch
_LAZY = {"Pipeline": "pipeline", "GenerationRequest": "request"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
