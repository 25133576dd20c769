"""The package's exceptions: one base class, one subclass per kind of failure.

Messages say what is wrong, where (file, key, flag) and how to fix it; the CLI prints them as one line.
"""


class LatentDiffError(Exception):
    """Base class of every error latentdiff raises on purpose."""


class CheckpointError(LatentDiffError):
    """A checkpoint file or folder is unreadable, unsafe, incomplete or mis-shaped."""


class UnsupportedModelError(LatentDiffError):
    """A well-formed checkpoint of an architecture latentdiff does not implement."""


class InputError(LatentDiffError, ValueError):
    """A bad argument, flag, prompt or input image."""


class GenerationError(LatentDiffError):
    """Generation produced something unusable (NaN/Inf) even after the fallbacks."""
