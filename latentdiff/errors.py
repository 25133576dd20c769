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


class FieldError(InputError):
    """A bad value of one request field. `field` is its Python name; the message reads "<field> <problem>",
    and an entry point that names fields its own way (the CLI: --flags) rewrites it with `problem`."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class GenerationError(LatentDiffError):
    """Generation produced something unusable (NaN/Inf) even after the fallbacks."""
