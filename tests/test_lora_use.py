"""LoRAs in use: A1111's prompt tags (`<lora:name:w>`, `<lora:name:te:unet>`), the LoRA folder and its names,
a request's `loras`, merging only when the set changes and un-merging exactly, the fast paths seeing a merge,
DoRA re-merged against the original weights, and the command line (--lora-dir, --lora NAME, --from-png)."""

import pytest
import torch
from safetensors.torch import save_file
from test_lora import TEXT_LAYERS, UNET_LAYERS, folder_weights, write_lora
from tiny import SD1, tiny_model

import latentdiff.lora_merge as lora_merge_module
from latentdiff import speedups
from latentdiff.errors import FieldError, InputError
from latentdiff.extra_networks import LoraTag, find_lora, prompt_loras, strip_tags
from latentdiff.formats.lora import lora_deltas, lora_hash
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

RUN = dict(steps=2, width=64, height=64, seed=4, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    model = tiny_model(SD1)
    root = tmp_path_factory.mktemp("lora-use")
    folder = save_model(model, root / "folder")
    loras = root / "Lora"
    (loras / "styles").mkdir(parents=True)
    write_lora(loras / "styles" / "Ink_Style.safetensors", folder_weights(folder))
    write_lora(loras / "detail.safetensors", folder_weights(folder), layers=UNET_LAYERS[:4] + TEXT_LAYERS[:2])
    return model, root, loras


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_tags_read_as_a1111_reads_them():
    tags, notes = prompt_loras(["a <lora:ink:0.8> cat <lora:b:0.5:1.5>, <lora:c> <lyco:d:te=0.2:unet=0.4> "
                                "<hypernet:h:1>", "a dog <lora:ink:0.8> <lora:e:1>"])
    assert tags == [LoraTag("ink", 0.8, 0.8), LoraTag("b", 0.5, 1.5), LoraTag("c", 1.0, 1.0), LoraTag("d", 0.2, 0.4)]
    assert len(notes) == 2  # the hypernet tag; prompt 2's own <lora:e:1> (its ink tag is the first prompt's)
    assert "'hypernet'" in notes[0] and "prompt 2 of the batch: <lora:e:1> is not applied" in notes[1]
    assert strip_tags("a <lora:ink:0.8> cat") == "a  cat"
    with pytest.raises(FieldError, match=r"<lora:ink:strong>: a weight is not a number"):
        prompt_loras(["<lora:ink:strong>"])


def test_names_are_stems_in_the_folder_and_subfolders(setup):
    _, _, loras = setup
    assert find_lora("Ink_Style", loras) == loras / "styles" / "Ink_Style.safetensors"
    assert find_lora("ink_style", loras) == loras / "styles" / "Ink_Style.safetensors"  # one stem ignoring case
    with pytest.raises(InputError, match=rf"LoRA 'ink_styl' not found in the LoRA folder {loras}.*did you mean "
                                         r"Ink_Style"):
        find_lora("ink_styl", loras)


def test_tags_merge_once_unmerge_exactly_and_stay_in_the_infotext(setup, monkeypatch):
    model, _, loras = setup
    pipe = Pipeline(model, device="cpu", dtype=torch.float32, lora_dir=loras)
    original = state(model)
    reads = []
    real_read = lora_merge_module.read_lora
    monkeypatch.setattr(lora_merge_module, "read_lora", lambda path, m: reads.append(path) or real_read(path, m))
    tagged = pipe.txt2img("a cat <lora:ink_style:0.7>", **RUN)
    merged = state(model)
    pipe.txt2img("a dog <lora:ink_style:0.7>", **RUN)
    assert len(reads) == 1  # the same set: not read or merged again
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    info = pipe.infotext(tagged.request, 0)
    assert info.startswith("a cat <lora:ink_style:0.7>\n")  # A1111 keeps the tags in the prompt
    assert f'Lora hashes: "Ink_Style: {lora_hash(loras / "styles" / "Ink_Style.safetensors")}"' in info

    plain = pipe.txt2img("a cat ", **RUN)  # no tag: un-merged, bit for bit
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert "Lora hashes" not in pipe.infotext(plain.request, 0)
    # the tag is not encoded: the same image as the merge made by hand and the prompt without it
    pipe.set_loras([(loras / "styles" / "Ink_Style.safetensors", 0.7)])
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    by_hand = pipe.txt2img("a cat ", **RUN)
    pipe.set_loras([])
    assert by_hand.images[0].tobytes() == tagged.images[0].tobytes() != plain.images[0].tobytes()


def test_text_encoder_and_unet_weights_apart_and_the_request_field(setup):
    model, _, loras = setup
    pipe = Pipeline(model, device="cpu", dtype=torch.float32, lora_dir=loras)
    original = state(model)
    pipe.txt2img("a cat <lora:detail:0:1>", **RUN)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    pipe.txt2img("a cat <lora:detail:1:0>", **RUN)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(k.startswith("cond_stage_model.") for k in changed)
    pipe.txt2img("a cat", loras=[("detail", 0.5), ("Ink_Style", (1.0, 0.25))], **RUN)  # names, as the tags
    a = lora_deltas(loras / "detail.safetensors", model, 0.5)
    b = lora_deltas(loras / "styles" / "Ink_Style.safetensors", model, (1.0, 0.25))
    want = {k: original[k] + a.get(k, 0) + b.get(k, 0) for k in original}
    assert all((v - want[k]).abs().max() <= 1e-6 for k, v in model.state_dict().items())  # fp32 rounding
    with pytest.raises(FieldError, match="loras"):
        pipe.txt2img("a cat", loras=[("detail", "strong")], **RUN)
    pipe.txt2img("a cat", **RUN)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_a_missing_tag_is_one_error_naming_it_and_the_folder(setup):
    model, _, loras = setup
    original = state(model)
    pipe = Pipeline(model, device="cpu", dtype=torch.float32, lora_dir=loras)
    with pytest.raises(InputError, match=rf"LoRA 'nowhere' not found in the LoRA folder {loras}"):
        pipe.txt2img("a cat <lora:detail:1> <lora:nowhere:1>", **RUN)
    with pytest.raises(FieldError, match="no LoRA folder is set"):
        Pipeline(model, device="cpu", dtype=torch.float32).txt2img("a cat <lora:detail:1>", **RUN)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()) and pipe.loras == []


def test_a_negative_prompt_tag_is_words_as_in_a1111(setup):
    model, _, loras = setup
    pipe = Pipeline(model, device="cpu", dtype=torch.float32, lora_dir=loras)
    result = pipe.txt2img("a cat", negative_prompt="blurry <lora:detail:1>", **RUN)
    assert pipe.loras == [] and any("negative prompt: <lora:detail:1> not applied" in n for n in result.notes)


def test_fast_paths_see_a_merge(setup):
    """Pre-packed convolutions and fused q/k/v, switched on after to(), compute with the merged weights."""
    model, _, loras = setup
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 32)
    plain = model.unet(x, t, context)
    pipe.set_loras([(loras / "styles" / "Ink_Style.safetensors", 1.0)])
    expected = model.unet(x, t, context)
    pipe.set_loras([])
    packed = speedups.prepack_convolutions(model, True)
    fused = speedups.fuse_projections(model, True)
    try:
        assert fused > 0
        assert (model.unet(x, t, context) - plain).abs().max() <= 1e-4  # packed before the merge
        pipe.set_loras([(loras / "styles" / "Ink_Style.safetensors", 1.0)])
        got = model.unet(x, t, context)
        pipe.set_loras([])
        # fp32: oneDNN's packed convolution and the fused matmul reorder sums, within 1e-4
        assert (got - expected).abs().max() <= 1e-4 < (expected - plain).abs().max()
    finally:
        speedups.prepack_convolutions(model, False)
        speedups.fuse_projections(model, False)
    assert packed or not torch.backends.mkldnn.is_available()


def test_dora_is_merged_against_the_original_weights(setup, tmp_path):
    """Replacing a DoRA merge by another strength gives what a fresh merge gives (the rescale reads the
    original weight, not the merged one)."""
    model, _, _ = setup
    weight = model.state_dict()["model.diffusion_model.middle_block.0.in_layers.2.weight"].clone()
    g = torch.Generator().manual_seed(3)
    layer = "lora_unet_mid_block_resnets_0_conv1"
    dora = tmp_path / "dora.safetensors"
    save_file({f"{layer}.lora_down.weight": torch.randn(4, 64, 3, 3, generator=g) * 0.1,
               f"{layer}.lora_up.weight": torch.randn(64, 4, 1, 1, generator=g) * 0.1,
               f"{layer}.dora_scale": weight.flatten(1).norm(dim=1).reshape(64, 1, 1, 1) * 1.5}, str(dora))
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    original = state(model)
    pipe.set_loras([(dora, 0.5)])
    fresh = state(model)
    pipe.set_loras([(dora, 1.0)])
    pipe.set_loras([(dora, 0.5)])
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    # at strength 1 each output row has the magnitude dora_scale says
    pipe.set_loras([(dora, 1.0)])
    rows = model.state_dict()["model.diffusion_model.middle_block.0.in_layers.2.weight"].flatten(1).norm(dim=1)
    assert torch.allclose(rows, weight.flatten(1).norm(dim=1) * 1.5, rtol=1e-5)
    pipe.set_loras([])
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_cli_lora_dir_tags_names_and_from_png(setup, tmp_path, capsys):
    from latentdiff.cli import main
    from latentdiff.infotext import parse_parameters, read_png_parameters
    model, root, loras = setup
    model_file = root / "tiny.safetensors"
    if not model_file.exists():
        save_model(model, model_file)
    args = ["-W", "64", "-H", "64", "--steps", "2", "--seed", "3", "--dtype", "fp32", "--model", str(model_file),
            "--quiet"]
    assert main(["txt2img", "a cat <lora:ink_style:0.6>", *args, "--lora-dir", str(loras), "--lora", "detail:0.5",
                 "-o", str(tmp_path / "a")]) == 0
    params = parse_parameters(read_png_parameters(tmp_path / "a" / "3.png")).params
    assert params["Lora hashes"] == (f"detail: {lora_hash(loras / 'detail.safetensors')}, "
                                     f"Ink_Style: {lora_hash(loras / 'styles' / 'Ink_Style.safetensors')}")
    capsys.readouterr()
    # the replay: the tag is found by name, the --lora one is named in one note
    assert main(["txt2img", "--from-png", str(tmp_path / "a" / "3.png"), *args, "--lora-dir", str(loras),
                 "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "Lora hashes" in line]
    assert notes == ["note: --from-png: Lora hashes: no tag in the prompt for detail (given with --lora when the "
                     "image was made: pass --lora NAME:WEIGHT again)"]
    assert main(["txt2img", "a cat <lora:gone:1>", *args, "--lora-dir", str(loras), "-o", str(tmp_path / "c")]) == 2
    assert f"LoRA 'gone' not found in the LoRA folder {loras}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_replay_notes_name_what_cannot_be_honoured(setup, tmp_path):
    from latentdiff.extra_networks import lora_replay_notes
    _, _, loras = setup
    ink = lora_hash(loras / "styles" / "Ink_Style.safetensors")
    value = f"Ink_Style: {ink}, detail: 0123456789ab, gone: 0123456789ab, extra: 0123456789ab"
    notes = lora_replay_notes(value, "a cat <lora:Ink_Style:1> <lora:detail:1> <lora:gone:0.5>", loras)
    assert notes == [f"--from-png: Lora hashes: not in {loras}: gone; {loras / 'detail.safetensors'} has hash "
                     f"{lora_hash(loras / 'detail.safetensors')}, the image's 'detail' had 0123456789ab; no tag in "
                     f"the prompt for extra (given with --lora when the image was made: pass --lora NAME:WEIGHT "
                     f"again)"]
    assert lora_replay_notes(f"Ink_Style: {ink}", "<lora:ink_style:1>", loras) == []  # found, same hash
