"""InstructPix2Pix fine-tuning (latentdiff/train/instruct.py) on a tiny random SD 1.x model: the edit triples
change the colour and nothing else, the widened model starts as the base model, training lowers the loss,
and the written file loads as an 8-channel model that edits through img2img."""

import numpy as np
import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff.errors import InputError
from latentdiff.instruct import is_instruct_model
from latentdiff.loader import load_model, save_model
from latentdiff.pipeline import Pipeline
from latentdiff.train.analyze import analyze
from latentdiff.train.instruct import InstructRecipe, edit_triple, instruct_stage, train_instruct, widen

pytestmark = pytest.mark.usefixtures("single_thread")

RECIPE = InstructRecipe(steps=40, batch_size=4, lr=1e-3, warmup=5, edits=8, log_every=10, checkpoint_every=20)


def test_an_edit_recolours_the_shape_and_keeps_the_rest():
    for i in range(12):
        before, instruction, after, label, target = edit_triple(0, i, 64)
        assert {k for k in label if label[k] != target[k]} == {"color"}
        assert target["color"] != label["background"] and target["color"] in instruction
        read_before, read_after = analyze(before), analyze(after)
        assert (read_before["color"], read_after["color"]) == (label["color"], target["color"])
        assert read_after["background"] == label["background"]
        # Same geometry: the pixels that differ are the shape's (the background keeps its jittered colour).
        changed = np.abs(np.asarray(before).astype(int) - np.asarray(after).astype(int)).sum(axis=2) > 0
        assert 0.01 < changed.mean() < 0.3


def test_the_widened_model_starts_as_the_base_model():
    base = tiny_model(SD1, seed=3)
    wide = widen(base)
    assert is_instruct_model(wide.config) and wide.unet.cfg.in_channels == 8
    x, image = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, context = torch.tensor([10, 700]), torch.randn(2, 77, SD1.text.width)
    with torch.no_grad():
        expected = base.unet(x, t, context)
        assert torch.equal(wide.unet(torch.cat([x, image], 1), t, context), expected)
    with pytest.raises(InputError, match="already takes 8 input channels"):
        widen(wide)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("instruct")
    base = save_model(tiny_model(SD1, seed=2), root / "base.safetensors")
    out = train_instruct(base, root / "edit.safetensors", RECIPE, mixed_precision="no", cpu=True, progress=False)
    return base, out


def test_training_lowers_the_loss_and_writes_an_8_channel_model(trained):
    base, out = trained
    model = load_model(out, dtype=torch.float32)
    assert is_instruct_model(model.config)
    start = widen(load_model(base, dtype=torch.float32))
    batch = instruct_stage(start, RECIPE, "cpu").make_batch(0, 0, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = instruct_stage(start, RECIPE, "cpu").module(batch)[0].item()
        after = instruct_stage(model, RECIPE, "cpu").module(batch)[0].item()
    print(f"loss on a fixed batch: {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    conv = model.unet.input_blocks[0][0].weight
    assert conv[:, 4:].abs().max() > 0, "the image channels' weights stayed zero: the image conditions nothing"
    log = (out.parent / "edit-training" / "logs" / "instruct.jsonl").read_text().splitlines()
    assert len(log) == RECIPE.steps // RECIPE.log_every


def test_the_written_model_edits_through_img2img(trained):
    """The file is an InstructPix2Pix checkpoint to the pipeline (three-way guidance, recorded), and its
    edit differs from the untrained widened model's, which ignores the image channels."""
    base, out = trained
    before, instruction, *_ = edit_triple(0, 0, 64)
    kwargs = dict(strength=1.0, steps=3, cfg_scale=5.0, image_cfg_scale=1.5, seed=1, progress=False)
    pipe = Pipeline(load_model(out), device="cpu", dtype=torch.float32)
    result = pipe.img2img(before, instruction, **kwargs)
    assert "Image CFG scale: 1.5" in pipe.infotext(result.request, 0)
    untrained = Pipeline(widen(load_model(base)).eval().requires_grad_(False), device="cpu", dtype=torch.float32)
    other = untrained.img2img(before, instruction, **kwargs)
    difference = np.abs(np.asarray(result.images[0]).astype(int) - np.asarray(other.images[0]).astype(int))
    assert difference.max() > 10


def test_an_existing_output_is_never_overwritten(trained):
    base, out = trained
    size = out.stat().st_size
    with pytest.raises(InputError, match="already exists"):
        train_instruct(base, out, RECIPE, mixed_precision="no", cpu=True, progress=False)
    assert out.stat().st_size == size


def test_the_committed_demo_model_follows_instructions_and_keeps_the_picture():
    """weights/demo/instruct.safetensors on the first 3 held-out edits of tools/instruct_demo.py (the
    evaluation stream, which training never draws): on 50 it followed 50/50 and kept the background 50/50
    and the grid cell 49/50 (benchmarks/instruct-demo.md), so each of these 3 must do all three."""
    from latentdiff.resources import REPOSITORY
    from latentdiff.train.evaluate import EVAL_SEED

    pipe = Pipeline(load_model(REPOSITORY / "weights/demo/instruct.safetensors"), device="cpu", dtype=torch.float32)
    for i in range(3):
        before, instruction, _, label, target = edit_triple(EVAL_SEED, i, 64)
        edit = pipe.img2img(before, instruction, strength=1.0, steps=20, sampler="Euler a", cfg_scale=5.0,
                            image_cfg_scale=1.5, seed=i, progress=False).images[0]
        read = analyze(edit)
        assert (read["color"], read["background"], read["position"]) == \
            (target["color"], label["background"], label["position"]), (i, instruction, read)
