"""`latentdiff convert`: dtypes kept, folders written with ordinary permissions, existing targets refused
with a hint that names the command line's own argument."""

import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from tiny import SD1, tiny_model

from latentdiff.cli import main
from latentdiff.errors import CheckpointError
from latentdiff.loader import save_model

pytestmark = pytest.mark.usefixtures("single_thread")


def dtypes(path) -> set:
    return {t.dtype for t in load_file(path).values()}


def test_fp16_file_stays_fp16_both_ways_unless_dtype_says(tmp_path):
    source = save_model(tiny_model(SD1).half(), tmp_path / "fp16.safetensors")
    assert main(["convert", str(source), str(tmp_path / "folder")]) == 0
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        assert dtypes(tmp_path / "folder" / f"{part}.safetensors") == {torch.float16}, part
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    original, back = load_file(source), load_file(tmp_path / "back.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert main(["convert", str(source), str(tmp_path / "fp32.safetensors"), "--dtype", "fp32"]) == 0
    assert dtypes(tmp_path / "fp32.safetensors") == {torch.float32}


def test_mixed_dtypes_are_kept_per_component(tmp_path):
    model = tiny_model(SD1)
    model.unet.half()  # an fp16 U-Net beside an fp32 VAE and text encoder
    source = save_model(model, tmp_path / "mixed.safetensors")
    assert main(["convert", str(source), str(tmp_path / "copy.safetensors")]) == 0
    original, copy = load_file(source), load_file(tmp_path / "copy.safetensors")
    assert {k: v.dtype for k, v in original.items()} == {k: v.dtype for k, v in copy.items()}
    assert {copy[k].dtype for k in copy if k.startswith("model.diffusion_model.")} == {torch.float16}
    assert all(torch.equal(original[k], copy[k]) for k in original)


def test_diffusers_folder_gets_ordinary_permissions(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()  # what any new folder here gets under this process's umask; files likewise
    os.close(os.open(tmp_path / "probe.txt", os.O_CREAT | os.O_WRONLY, 0o666))
    folder_mode, file_mode = stat.S_IMODE(probe.stat().st_mode), stat.S_IMODE((tmp_path / "probe.txt").stat().st_mode)
    folder = save_model(tiny_model(SD1), tmp_path / "folder")
    for path in [folder, *folder.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (folder_mode if path.is_dir() else file_mode), path


@pytest.mark.parametrize("target", ["exists.safetensors", "exists_folder"])
def test_existing_target_is_refused_before_loading_and_named_as_the_cli_says(tmp_path, target, capsys):
    source = save_model(tiny_model(SD1), tmp_path / "m.safetensors")
    existing = tmp_path / target
    existing.mkdir() if "folder" in target else existing.write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["convert", str(source), str(existing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TARGET" in err[0] and "already exists" in err[0] and "overwrite=" not in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if existing.is_file():
        assert existing.read_bytes() == b"keep me"
    with pytest.raises(CheckpointError, match="never overwrites a model") as caught:
        save_model(tiny_model(SD1), existing)  # the library names no parameter save_model lacks
    assert "overwrite=" not in str(caught.value)
