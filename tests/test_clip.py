"""CLIP text encoder: parity with transformers' CLIPTextModel, the OpenCLIP adapter, configs, detection."""

import dataclasses

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.clip import TextEncoder
from latentdiff.config import TextEncoderConfig
from latentdiff.errors import CheckpointError, InputError, UnsupportedModelError
from latentdiff.formats.clip_keys import (detect_text_config, openclip_to_ours, ours_to_openclip, text_config_from_hf,
                                     text_config_to_hf)

# fp32 on CPU, same math in a different order (SDPA vs eager softmax): differences are rounding only.
ATOL = 1e-4
VOCAB, WIDTH, HEADS, FF, LAYERS = 1000, 64, 4, 128, 3
END = VOCAB - 1  # the end token is the last vocabulary entry, as 49407 is in CLIP's


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm gains around 1), so a mis-wired weight cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_gain = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_norm_gain else 0.2 * noise)


def hf_model(layers: int, activation: str, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=layers,
                            num_attention_heads=HEADS, max_position_embeddings=77, hidden_act=activation,
                            bos_token_id=VOCAB - 2, eos_token_id=END, attn_implementation="eager")
    model = CLIPTextModel(config).eval()
    randomize(model, seed)
    return model


def hf_to_ours(sd: dict) -> dict:
    # Files written by transformers name keys text_model.*; CLIPTextModel 5.x drops that level in memory.
    return {"transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


def our_config(layers=LAYERS, activation="quick_gelu", **kw) -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=VOCAB, width=WIDTH, layers=layers, heads=HEADS, ff_width=FF,
                             activation=activation, **kw)


def sample_tokens(pad_id: int, seed: int = 0) -> torch.Tensor:
    """Two 77-token rows shaped like Tokenizer output: start, random ids, end, padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in (9, 40):
        body = torch.randint(1, VOCAB - 2, (length,), generator=g).tolist()
        row = [VOCAB - 2, *body, END]
        rows.append(row + [pad_id] * (77 - len(row)))
    return torch.tensor(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_every_layer_matches_transformers(activation):
    reference = hf_model(LAYERS, activation, seed=1)
    ours = TextEncoder(our_config(activation=activation)).eval()
    ours.load_state_dict(hf_to_ours(reference.state_dict()), strict=True)
    tokens = sample_tokens(pad_id=END)
    with torch.no_grad():
        ref = reference(tokens, output_hidden_states=True)
        # hidden_states[0] is the embedding output, [k] the output of block k.
        for layer in range(-LAYERS, 0):
            expected = reference.final_layer_norm(ref.hidden_states[layer])
            assert max_diff(ours(tokens, layer=layer), expected) <= ATOL, f"layer {layer}"
        assert max_diff(ours(tokens), ref.last_hidden_state) <= ATOL  # default output_layer=-1
        assert max_diff(ours.pooled(tokens), ref.pooler_output) <= ATOL


def test_default_layer_is_config_output_layer():
    reference = hf_model(LAYERS, "gelu", seed=2)
    ours = TextEncoder(our_config(activation="gelu", output_layer=-2)).eval()
    ours.load_state_dict(hf_to_ours(reference.state_dict()), strict=True)
    tokens = sample_tokens(pad_id=0)
    with torch.no_grad():
        penultimate = reference.final_layer_norm(reference(tokens, output_hidden_states=True).hidden_states[-2])
        assert max_diff(ours(tokens), penultimate) <= ATOL


def test_layers_after_the_requested_one_are_not_run():
    ours = TextEncoder(our_config()).eval()
    randomize(ours, seed=3)
    tokens = sample_tokens(pad_id=END)
    with torch.no_grad():
        before = ours(tokens, layer=-2)
        ours.transformer.text_model.encoder.layers[-1].mlp.fc1.weight.fill_(float("nan"))
        assert torch.equal(ours(tokens, layer=-2), before)
        assert torch.isnan(ours(tokens, layer=-1)).all()


def test_state_dict_keys_are_the_sd1_checkpoint_keys():
    keys = set(TextEncoder(our_config(layers=1)).state_dict())
    prefix = "transformer.text_model."
    expected = {prefix + "embeddings.token_embedding.weight", prefix + "embeddings.position_embedding.weight",
                prefix + "final_layer_norm.weight", prefix + "final_layer_norm.bias"}
    for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]:
        expected |= {f"{prefix}encoder.layers.0.{name}.weight", f"{prefix}encoder.layers.0.{name}.bias"}
    assert keys == expected


def random_openclip_sd(layers: int, seed: int) -> dict:
    """An SD 2.x-style text tower in OpenCLIP's own key names (a file's cond_stage_model.model.*)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, gain=False):
        noise = 0.2 * torch.randn(shape, generator=g)
        return 1 + noise if gain else noise

    sd = {"token_embedding.weight": rand(VOCAB, WIDTH), "positional_embedding": rand(77, WIDTH),
          "ln_final.weight": rand(WIDTH, gain=True), "ln_final.bias": rand(WIDTH),
          "text_projection": rand(WIDTH, WIDTH), "logit_scale": torch.tensor(4.6)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd |= {b + "ln_1.weight": rand(WIDTH, gain=True), b + "ln_1.bias": rand(WIDTH),
               b + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": rand(3 * WIDTH),
               b + "attn.out_proj.weight": rand(WIDTH, WIDTH), b + "attn.out_proj.bias": rand(WIDTH),
               b + "ln_2.weight": rand(WIDTH, gain=True), b + "ln_2.bias": rand(WIDTH),
               b + "mlp.c_fc.weight": rand(FF, WIDTH), b + "mlp.c_fc.bias": rand(FF),
               b + "mlp.c_proj.weight": rand(WIDTH, FF), b + "mlp.c_proj.bias": rand(WIDTH)}
    return sd


def test_openclip_round_trip_is_lossless():
    fused = random_openclip_sd(LAYERS, seed=4)
    ours, ignored = openclip_to_ours(fused)
    assert sorted(ignored) == ["logit_scale", "text_projection"]
    TextEncoder(our_config(activation="gelu")).load_state_dict(ours, strict=True)  # every weight, no extra
    back = ours_to_openclip(ours)
    assert set(back) == set(fused) - set(ignored)
    assert all(torch.equal(back[k], fused[k]) for k in back)


def test_openclip_penultimate_equals_diffusers_conversion():
    """SD 2.x: our N-layer model at output -2 equals diffusers' converted N-1 layer CLIPTextModel."""
    fused = random_openclip_sd(LAYERS, seed=5)
    ours = TextEncoder(our_config(activation="gelu", output_layer=-2, pad_id=0)).eval()
    ours.load_state_dict(openclip_to_ours(fused)[0], strict=True)

    reference = hf_model(LAYERS - 1, "gelu", seed=0)
    converted = convert_open_clip_checkpoint(reference, {"cond_stage_model.model." + k: v for k, v in fused.items()})
    # diffusers drops the last block only at ViT-H's depth (24); drop it here, and the projection.
    unused = (f"text_model.encoder.layers.{LAYERS - 1}.", "text_projection")
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.startswith(unused)}
    reference.load_state_dict(converted, strict=True)

    tokens = sample_tokens(pad_id=0, seed=1)
    with torch.no_grad():
        assert max_diff(ours(tokens), reference(tokens).last_hidden_state) <= ATOL


@pytest.mark.parametrize("cfg", [our_config(), our_config(activation="gelu", pad_id=0)])
def test_config_round_trip_through_hf_dict(cfg):
    d = text_config_to_hf(cfg)
    assert text_config_from_hf(d, pad_id=cfg.pad_id) == cfg
    assert text_config_from_hf(d) == cfg  # the family's pad id when none is given
    model = CLIPTextModel(CLIPTextConfig(**d))  # transformers accepts the dict ...
    TextEncoder(cfg).load_state_dict(hf_to_ours(model.state_dict()), strict=True)  # ... with our weights' shapes


def test_hf_dict_keeps_only_layers_up_to_the_output_layer():
    cfg = our_config(layers=4, activation="gelu", output_layer=-2, pad_id=0)
    assert text_config_from_hf(text_config_to_hf(cfg)) == dataclasses.replace(cfg, layers=3, output_layer=-1)


def test_config_from_a_transformers_written_dict():
    d = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=FF, num_hidden_layers=2,
                       num_attention_heads=HEADS, hidden_act="gelu").to_dict()
    cfg = text_config_from_hf(d)
    assert (cfg.vocab_size, cfg.width, cfg.ff_width, cfg.layers, cfg.heads, cfg.activation, cfg.max_length) == (
        VOCAB, WIDTH, FF, 2, HEADS, "gelu", 77)


@pytest.mark.parametrize("openclip", [False, True])
def test_detect_config_from_shapes(openclip):
    # Detection assumes 64-wide heads, as in every CLIP text tower SD uses.
    cfg = TextEncoderConfig(vocab_size=VOCAB, max_length=50, width=128, layers=3, heads=2, ff_width=96,
                            **({"activation": "gelu", "output_layer": -2, "pad_id": 0} if openclip else {}))
    sd = TextEncoder(cfg).state_dict()
    if openclip:  # the way a single file is read: convert the OpenCLIP keys, then detect
        sd, _ = openclip_to_ours(ours_to_openclip(sd))
    assert detect_text_config(sd, openclip=openclip) == cfg


def test_bad_inputs_raise_clear_errors():
    fused = random_openclip_sd(1, seed=6)
    with pytest.raises(CheckpointError, match="resblocks.0.attn.bogus"):
        openclip_to_ours(fused | {"transformer.resblocks.0.attn.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'model.token_embedding.weight'.*stripped"):
        openclip_to_ours({"model." + k: v for k, v in fused.items()})
    with pytest.raises(CheckpointError, match="in_proj_bias' has 7 rows"):
        openclip_to_ours(fused | {"transformer.resblocks.0.attn.in_proj_bias": torch.zeros(7)})
    ours = openclip_to_ours(fused)[0]
    with pytest.raises(CheckpointError, match="only \\['q', 'v'\\]"):
        ours_to_openclip({k: v for k, v in ours.items() if "k_proj" not in k})
    with pytest.raises(CheckpointError, match="position_embedding"):
        detect_text_config({k: v for k, v in ours.items() if "position" not in k}, openclip=True)
    with pytest.raises(CheckpointError, match="blocks \\[1\\]"):
        detect_text_config({k.replace("layers.0.", "layers.1."): v for k, v in ours.items()}, openclip=True)
    with pytest.raises(CheckpointError, match="hidden_size"):
        text_config_from_hf({"vocab_size": 10})
    with pytest.raises(UnsupportedModelError, match="gelu_new"):
        text_config_from_hf(text_config_to_hf(our_config()) | {"hidden_act": "gelu_new"})

    model = TextEncoder(our_config(layers=2))
    tokens = sample_tokens(pad_id=END)
    with pytest.raises(InputError, match="layer=0"):
        model(tokens, layer=0)
    with pytest.raises(InputError, match="layer=-3"):
        model(tokens, layer=-3)
    with pytest.raises(InputError, match="exceed max_length 77"):
        model(torch.cat([tokens, tokens], dim=1))
    with pytest.raises(InputError, match="no end-of-text token"):
        model.pooled(torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(InputError, match="activation"):
        TextEncoder(our_config(activation="relu"))
