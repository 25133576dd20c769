"""latentdiff: a compact, from-scratch PyTorch implementation of Stable Diffusion."""

from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from .errors import CheckpointError, GenerationError, InputError, LatentDiffError, UnsupportedModelError

__version__ = "0.1.0"
