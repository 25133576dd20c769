"""The LoRA files merged into a model's weights now: merged only when the set changes, restored bit for bit."""

from pathlib import Path

from .formats.lora import Strength, layer_deltas, lora_hash, read_lora
from .model import StableDiffusion
from .patches import apply_patches


class MergedLoras:
    """`used`: what is merged into `model` now, [(path, strength, A1111 short hash)]; `merge(loras)` makes that
    exactly `loras` (patches.py: the weights are written in place, so the fast paths see them)."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self.used: list[tuple[Path, Strength, str]] = []
        self._patches, self._key = None, []  # the patches.Patched handle; what identifies the merged set

    def merge(self, loras: list[tuple[Path, Strength]]) -> None:
        """Nothing happens when `loras` are the ones merged now (same files, unchanged, same strengths);
        otherwise every file is read and checked, the old merge restored, the new one applied. DoRA layers
        rescale the original weights, which the old merge's handle still holds."""
        key = [(path.resolve(), strength, path.stat().st_mtime_ns) for path, strength in loras]
        if key == self._key:
            return
        originals = self._patches.originals if self._patches is not None else {}
        deltas = {}
        for path, strength in loras:
            for name, delta in layer_deltas(read_lora(path, self.model), self.model, strength, originals).items():
                deltas[name] = deltas[name] + delta if name in deltas else delta
        used = [(path, strength, lora_hash(path)) for path, strength in loras]
        if self._patches is not None:
            self._patches.restore()
            self._patches, self.used, self._key = None, [], []
        self._patches = apply_patches(self.model, deltas) if deltas else None
        self.used, self._key = used, key
