"""kohya LoRA files merged through the reversible weight patches: number for number against diffusers'
load_lora_weights + fuse_lora on a tiny random SD 1.x model, exact un-merge, the CLI flag and the infotext
entry, and one clear error for files that do not fit."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file
from tiny import SD1, SD2_V, tiny_model

from latentdiff.checkpoint import read_state_dict
from latentdiff.cli import _lora_arg
from latentdiff.errors import CheckpointError
from latentdiff.formats.lora import layer_names, lora_deltas, lora_hash
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

BLOCK = "down_blocks.0.attentions.0"
TB = f"{BLOCK}.transformer_blocks.0"
# (diffusers module, is a 3x3 LoCon): attention projections, proj_in/out (1x1 convs in SD 1.x), the
# feed-forward, a resnet's 3x3 convolution, and text-encoder layers
UNET_LAYERS = [f"{TB}.attn1.to_q", f"{TB}.attn1.to_k", f"{TB}.attn1.to_v", f"{TB}.attn1.to_out.0",
               f"{TB}.attn2.to_k", f"{TB}.attn2.to_v", f"up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
               f"{BLOCK}.proj_in", f"{BLOCK}.proj_out", f"{TB}.ff.net.0.proj", f"{TB}.ff.net.2",
               "mid_block.resnets.0.conv1"]
TEXT_LAYERS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.k_proj",
               "text_model.encoder.layers.1.self_attn.v_proj", "text_model.encoder.layers.1.self_attn.out_proj",
               "text_model.encoder.layers.0.mlp.fc1"]
RANK, ALPHA = 4, 2.0


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_lora(path, folder_sd: dict[str, torch.Tensor], layers=UNET_LAYERS + TEXT_LAYERS, prefix=None,
               alpha=ALPHA) -> None:
    """A kohya file for `layers` of a model whose diffusers weights are `folder_sd` (module -> weight);
    alpha=None writes none (kohya and A1111 then scale by 1, as if alpha were the rank)."""
    sd = {}
    for seed, layer in enumerate(layers):
        shape = folder_sd[layer + ".weight"].shape
        name = prefix or ("lora_unet_" if not layer.startswith("text_model") else "lora_te_")
        name += layer.replace(".", "_")
        kernel = shape[2:]
        sd[f"{name}.lora_down.weight"] = randn(RANK, shape[1], *kernel, seed=2 * seed) * 0.3
        sd[f"{name}.lora_up.weight"] = randn(shape[0], RANK, *(1,) * len(kernel), seed=2 * seed + 1) * 0.3
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))


def folder_weights(folder) -> dict[str, torch.Tensor]:
    return {**read_state_dict(next((folder / "unet").glob("*.safetensors"))),
            **read_state_dict(next((folder / "text_encoder").glob("*.safetensors")))}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, single_thread):
    model = tiny_model(SD1)
    root = tmp_path_factory.mktemp("lora")
    folder = save_model(model, root / "folder")
    lora = root / "detail.safetensors"
    write_lora(lora, folder_weights(folder))
    return model, folder, lora


def outputs(unet, text, diffusers: bool):
    x, t, context = randn(2, 4, 8, 8, seed=10), torch.tensor([500.0, 20.0]), randn(2, 5, 32, seed=11)
    tokens = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        if diffusers:
            return unet(x, t, encoder_hidden_states=context).sample, text(tokens).last_hidden_state
        return unet(x, t, context), text(tokens)


# Files whose every layer has an alpha, and files with none: diffusers gives a layer without alpha the
# file's first alpha when others have one (its peft config's default), where kohya and A1111 scale it by 1.
@pytest.mark.parametrize("alpha", [ALPHA, None], ids=["alpha", "no-alpha"])
def test_merge_matches_diffusers_fuse_lora(sd1, alpha, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the `test` extra)")
    from diffusers import StableDiffusionPipeline
    model, folder, _ = sd1
    lora = tmp_path / "lora.safetensors"
    write_lora(lora, folder_weights(folder), alpha=alpha)
    weight = 0.7
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                     local_files_only=True)
    plain = outputs(theirs.unet, theirs.text_encoder, diffusers=True)
    theirs.load_lora_weights(str(lora))
    # the same adapters as diffusers writes them (peft names, alphas in the metadata): read as the kohya file
    from peft.utils import get_peft_model_state_dict
    adapter = theirs.get_active_adapters()[0]
    layers = {f"{part}_lora_layers": get_peft_model_state_dict(getattr(theirs, part), adapter_name=adapter)
              for part in ("unet", "text_encoder")}
    configs = {f"{part}_lora_adapter_metadata": getattr(theirs, part).peft_config[adapter].to_dict()
               for part in ("unet", "text_encoder")}
    theirs.save_lora_weights(tmp_path / "peft", **layers, **configs)
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    assert next(iter(read_state_dict(peft_file))).startswith(("unet.", "text_encoder."))
    theirs.fuse_lora(lora_scale=weight)
    expected = outputs(theirs.unet, theirs.text_encoder, diffusers=True)

    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    before = outputs(model.unet, model.text_encoder, diffusers=False)
    pipe.set_loras([(lora, weight)])
    merged = outputs(model.unet, model.text_encoder, diffusers=False)
    pipe.set_loras([(peft_file, weight)])
    merged_peft = outputs(model.unet, model.text_encoder, diffusers=False)
    pipe.set_loras([])
    # fp32 on both sides; the merged weights differ by rounding only, activations within 1e-4
    for ours, ours_peft, want, was in zip(merged, merged_peft, expected, plain):
        assert (ours - want).abs().max() <= 1e-4
        assert (ours_peft - want).abs().max() <= 1e-4
        assert (want - was).abs().max() > 1e-2  # the LoRA changed the output: the comparison means something
    for b, p in zip(before, plain):
        assert (b - p).abs().max() <= 1e-4


def test_set_loras_restores_bit_for_bit_and_writes_the_infotext(sd1, tmp_path):
    model, folder, lora = sd1
    second = tmp_path / "style,v2.safetensors"
    write_lora(second, folder_weights(folder), layers=UNET_LAYERS[:3])
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe.set_loras([(lora, 1.0), (second, -0.5)])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == set(lora_deltas(lora, model)) | set(lora_deltas(second, model))
    pipe.set_loras([(second, 0.3)])  # replaces the set: restores first, then merges
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == set(lora_deltas(second, model))
    pipe.set_loras([])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    pipe.set_loras([(lora, 0.8), (second, 1.0)])
    request, _ = pipe.prepare(pipe_request())
    info = pipe.infotext(request, 0)
    assert f'Lora hashes: "detail: {lora_hash(lora)}, stylev2: {lora_hash(second)}"' in info
    pipe.set_loras([])
    assert "Lora hashes" not in pipe.infotext(request, 0)


def pipe_request():
    from latentdiff.request import GenerationRequest
    return GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=1)


def test_lora_hash_skips_the_safetensors_header(sd1):
    """A1111's "addnet" hash: the sha256 of what follows the 8-byte length and the JSON header."""
    _, _, lora = sd1
    data = lora.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert lora_hash(lora) == hashlib.sha256(body).hexdigest()[:12] != hashlib.sha256(data).hexdigest()[:12]


def test_sd2_linear_projections_take_the_same_names(tmp_path):
    model = tiny_model(SD2_V)
    folder = save_model(model, tmp_path / "sd2")
    lora = tmp_path / "sd2.safetensors"
    write_lora(lora, folder_weights(folder))  # proj_in/proj_out are Linear layers in SD 2.x
    deltas = lora_deltas(lora, model, 0.5)
    assert len(deltas) == len(UNET_LAYERS + TEXT_LAYERS)
    assert deltas["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2


def test_files_that_do_not_fit_are_refused_before_anything_changes(sd1, tmp_path):
    model, folder, lora = sd1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    weights = folder_weights(folder)
    sdxl = tmp_path / "sdxl.safetensors"
    write_lora(sdxl, weights, layers=UNET_LAYERS[:2], prefix="lora_te1_")
    with pytest.raises(CheckpointError, match=r"2 of 2 LoRA layers match no layer .*'lora_te1_.*0 matched"):
        pipe.set_loras([(lora, 1.0), (sdxl, 1.0)])
    wide = tmp_path / "wide.safetensors"
    save_file({"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.zeros(4, 320, 3, 3),
               "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.zeros(320, 4, 1, 1)}, str(wide))
    with pytest.raises(CheckpointError, match=r"conv1': lora parts lora_down.weight \(4, 320, 3, 3\), lora_up.weight "
                                              r"\(320, 4, 1, 1\) do not fit the model's weight \(64, 64, 3, 3\)"):
        pipe.set_loras([(wide, 1.0)])
    oft = tmp_path / "oft.safetensors"
    save_file({"lora_unet_mid_block_resnets_0_conv1.oft_blocks": torch.zeros(4, 16, 16)}, str(oft))
    with pytest.raises(CheckpointError, match=r"oft\.safetensors: key .*oft_blocks' is not a LoRA/LyCORIS part "
                                              r"\(LyCORIS OFT, not supported\)"):
        pipe.set_loras([(oft, 1.0)])
    half = tmp_path / "half.safetensors"  # a LoHa layer without its second pair
    save_file({"lora_unet_mid_block_resnets_0_conv1.hada_w1_a": torch.zeros(64, 4),
               "lora_unet_mid_block_resnets_0_conv1.hada_w1_b": torch.zeros(4, 576)}, str(half))
    with pytest.raises(CheckpointError, match=r"layer 'lora_unet_mid_block_resnets_0_conv1': it is loha but lacks "
                                              r"hada_w2_a, hada_w2_b"):
        pipe.set_loras([(half, 1.0)])
    bad_dora = tmp_path / "bad_dora.safetensors"
    save_file({"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.zeros(4, 64, 3, 3),
               "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.zeros(64, 4, 1, 1),
               "lora_unet_mid_block_resnets_0_conv1.dora_scale": torch.ones(1, 32, 1, 1)}, str(bad_dora))
    with pytest.raises(CheckpointError, match=r"bad_dora.*conv1': dora_scale \(1, 32, 1, 1\) fits neither the "
                                              r"weight's 64 output rows nor its 64 input columns"):
        pipe.set_loras([(bad_dora, 1.0)])
    nan = tmp_path / "nan.safetensors"
    save_file({"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.full((4, 64, 3, 3), float("nan")),
               "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.zeros(64, 4, 1, 1)}, str(nan))
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: layer .*: lora_down.weight hold NaN or Inf"):
        pipe.set_loras([(lora, 1.0), (nan, 1.0)])
    wide_diffusers = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.mid_block.resnets.0.conv1.lora_A.weight": torch.zeros(4, 32, 3, 3),
               "unet.mid_block.resnets.0.conv1.lora_B.weight": torch.zeros(64, 4, 1, 1)}, str(wide_diffusers))
    with pytest.raises(CheckpointError, match=r"'unet\.mid_block\.resnets\.0\.conv1': lora parts .* do not fit"):
        pipe.set_loras([(wide_diffusers, 1.0)])
    pickled = tmp_path / "code.pt"
    torch.save({"lora_unet_mid_block_resnets_0_conv1.alpha": Runs()}, pickled)
    with pytest.raises(CheckpointError, match="code"):
        pipe.set_loras([(pickled, 1.0)])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        pipe.set_loras([(truncated, 1.0)])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert pipe.loras == []


class Runs:
    """A pickle that would run code when loaded (os.getcwd here: harmless if it ever did)."""

    def __reduce__(self):
        import os
        return os.getcwd, ()


def test_lora_flag_weight():
    assert _lora_arg("a/b.safetensors:0.6") == ("a/b.safetensors", 0.6)
    assert _lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert _lora_arg(r"C:\loras\b.safetensors") == (r"C:\loras\b.safetensors", 1.0)


def test_cli_lora_flag_merges_and_records_the_file(sd1, tmp_path, capsys):
    from latentdiff.cli import main
    from latentdiff.infotext import parse_parameters, read_png_parameters
    model, _, lora = sd1
    model_file = save_model(model, tmp_path / "tiny.safetensors")
    args = ["txt2img", "a cat", "-W", "64", "-H", "64", "--steps", "2", "--seed", "3", "--dtype", "fp32",
            "--model", str(model_file)]
    assert main([*args, "-o", str(tmp_path / "plain")]) == 0
    assert main([*args, "--lora", f"{lora}:0.5", "-o", str(tmp_path / "lora")]) == 0
    _, _, params = parse_parameters(read_png_parameters(tmp_path / "lora" / "3.png"))
    assert params["Lora hashes"] == f"detail: {lora_hash(lora)}"
    assert (tmp_path / "plain" / "3.png").read_bytes() != (tmp_path / "lora" / "3.png").read_bytes()
    capsys.readouterr()
    assert main([*args, "--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x")]) != 0
    assert "LoRA file not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_peft_dora_file_matches_peft_forward(sd1, tmp_path):
    """A diffusers/peft file with DoRA (`lora_magnitude_vector`, one magnitude per output row), against the
    peft-adapted diffusers U-Net it came from."""
    pytest.importorskip("peft", reason="peft makes the reference (the `test` extra)")
    import json

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model, folder, _ = sd1
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=["to_q", "to_v", "to_out.0", "conv1"])
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # peft starts at a zero delta and the weights' own norms: move both
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(p * (1 + 0.3 * torch.randn(p.shape, generator=gen)) if "magnitude" in name
                        else torch.randn(p.shape, generator=gen) * 0.3)
    x, t, context = randn(2, 4, 8, 8, seed=10), torch.tensor([500.0, 20.0]), randn(2, 5, 32, seed=11)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=context).sample
    path = tmp_path / "dora.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, str(path),
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": ALPHA, "unet.r": RANK})})
    pipe = Pipeline(model, device="cpu", dtype=torch.float32)
    plain = model.unet(x, t, context)
    pipe.set_loras([(path, 1.0)])
    merged = model.unet(x, t, context)
    pipe.set_loras([])
    assert (merged - expected).abs().max() <= 1e-4 < (expected - plain).abs().max()  # fp32, as above


def test_every_naming_of_a_layer_gives_the_same_delta(sd1, tmp_path):
    """kohya's diffusers-path names, kohya names of the ldm path (as ComfyUI reads them), peft's lora_A/B,
    diffusers' older lora.down/up, lora_linear_layer and attention-processor names: one LoRA, one delta."""
    model, folder, lora = sd1
    kohya = read_state_dict(lora)
    want = lora_deltas(lora, model, 0.6)
    names = layer_names(model)
    # our parameter -> its diffusers module path ("unet.…" / "text_encoder.text_model.…") and its ldm-path kohya name
    dotted = {param: name for name, param in names.items() if name.startswith(("unet.", "text_encoder.text_model."))}
    ldm = {param: name for name, param in names.items() if name.startswith("lora_unet_")
           and name != "lora_unet_" + dotted[param][len("unet."):].replace(".", "_")}

    def renamed(style):
        out = {}
        for key, value in kohya.items():
            layer, part = key.split(".", 1)
            param = names[layer]
            module = dotted[param]
            if style == "ldm":
                out[f"{ldm.get(param, layer)}.{part}"] = value
                continue
            suffix = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[part]
            if suffix == "alpha":
                out[f"{module}.alpha"] = value
            elif style == "peft":
                out[f"{module}.lora_{'A' if suffix == 'down' else 'B'}.weight"] = value
            elif style == "processor" and module.startswith("unet.") and ".attn" in module:
                head, proj = module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
                out[f"{head}.processor.{proj}_lora.{suffix}.weight"] = value
            elif module.startswith("text_encoder."):
                out[f"{module}.lora_linear_layer.{suffix}.weight"] = value
            else:
                out[f"{module}.lora.{suffix}.weight"] = value
        return out

    for style in ("ldm", "peft", "processor", "old"):
        path = tmp_path / f"{style}.safetensors"
        save_file(renamed(style), str(path))
        got = lora_deltas(path, model, 0.6)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), style
