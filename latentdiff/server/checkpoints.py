"""The checkpoints a server offers: the files and diffusers folders of its model folder, plus the one it
started with, as A1111's /sdapi/v1/sd-models lists them. A request names a checkpoint by its title or
name; it never gives a path, so nothing outside the configured folders is ever opened."""

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    name: str  # as A1111: the file's path inside the model folder ("sub/model.safetensors")

    @property
    def model_name(self) -> str:
        return Path(self.name).with_suffix("").as_posix().replace("/", "_") if self.path.is_file() else self.name

    def title(self, short_hash: str | None) -> str:
        """A1111's title: "name [short hash]", the hash once it is known (hashing a 4 GB file takes seconds)."""
        return f"{self.name} [{short_hash}]" if short_hash else self.name


def scan(model_dir: Path | None, initial: Path) -> list[Checkpoint]:
    """The initial checkpoint first, then every checkpoint file and diffusers folder (a folder with a
    model_index.json) under `model_dir`, sorted by name."""
    found = {initial.resolve(): Checkpoint(initial, initial.name)}
    if model_dir is not None:
        for path in sorted(model_dir.rglob("*")):
            is_model = path.suffix.lower() in SUFFIXES and path.is_file() or (path / "model_index.json").is_file()
            if is_model and not any(part.startswith(".") for part in path.relative_to(model_dir).parts):
                found.setdefault(path.resolve(), Checkpoint(path, path.relative_to(model_dir).as_posix()))
    return list(found.values())


def find(checkpoints: list[Checkpoint], wanted: str, hashes: dict[Path, str]) -> Checkpoint:
    """The checkpoint a client names: by title ("name [hash]"), name, model_name or name without the hash."""
    if not isinstance(wanted, str):
        raise InputError(f"a checkpoint is named by a string, not {wanted!r}")
    bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
    for checkpoint in checkpoints:
        names = {checkpoint.name, checkpoint.model_name, checkpoint.title(hashes.get(checkpoint.path)),
                 checkpoint.path.stem}
        if wanted in names or bare in names:
            return checkpoint
    raise InputError(f"model {wanted!r} not found; GET /sdapi/v1/sd-models lists the titles "
                     f"({', '.join(c.name for c in checkpoints)}); POST /sdapi/v1/refresh-checkpoints rescans")
