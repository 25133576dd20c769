"""latentdiff: a compact, from-scratch PyTorch implementation of Stable Diffusion."""

from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from .errors import CheckpointError, FieldError, GenerationError, InputError, LatentDiffError, UnsupportedModelError

__version__ = "0.1.0"


def __getattr__(name):
    # `from latentdiff import Pipeline` without importing torch for every `import latentdiff` (the CLI's start-up)
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
