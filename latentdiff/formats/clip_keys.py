"""Other layouts of the CLIP text encoder: SD 2.x OpenCLIP keys, transformers configs, shape detection.

Key convention. Our keys are the SD 1.x single-file keys after `cond_stage_model.`
(`transformer.text_model.*`). OpenCLIP keys are OpenCLIP's own parameter names, i.e. an SD 2.x file's
`cond_stage_model.model.*` keys with that whole prefix stripped (`transformer.resblocks.0.attn.in_proj_weight`,
`token_embedding.weight`); the caller strips it, and adds it back when writing, because only the caller
knows where in the file the text tower sits.
"""

import re

import torch

from ..config import TextEncoderConfig
from ..errors import CheckpointError, UnsupportedModelError

OURS = "transformer.text_model."
LAYER = "encoder.layers."

# OpenCLIP name -> our name, outside the blocks (both without their prefix).
OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
# Inside block i: OpenCLIP `transformer.resblocks.{i}.<name>` -> our `encoder.layers.{i}.<name>`.
OPENCLIP_BLOCK = {
    f"{theirs}.{p}": f"{ours}.{p}"
    for theirs, ours in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    for p in ("weight", "bias")
}
# OpenCLIP fuses q, k, v into one projection (rows in that order); ours keeps three Linears.
OPENCLIP_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
# Contrastive-training parameters that SD never uses: reported, not loaded.
OPENCLIP_UNUSED = ("text_projection", "logit_scale")
OPENCLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
OURS_BLOCK_KEY = re.compile(re.escape(LAYER) + r"(\d+)\.(.+)")


def openclip_to_ours(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SD 2.x OpenCLIP text weights -> our keys; also returns the unused keys it skipped."""
    out, ignored = {}, []
    for key, value in sd.items():
        block = OPENCLIP_BLOCK_KEY.fullmatch(key)
        if key in OPENCLIP_UNUSED:
            ignored.append(key)
        elif key in OPENCLIP_TOP:
            out[OURS + OPENCLIP_TOP[key]] = value
        elif block and block[2] in OPENCLIP_BLOCK:
            out[f"{OURS}{LAYER}{block[1]}.{OPENCLIP_BLOCK[block[2]]}"] = value
        elif block and block[2] in OPENCLIP_FUSED:
            if value.shape[0] % 3:
                raise CheckpointError(f"OpenCLIP key {key!r} has {value.shape[0]} rows, not 3 * width (q, k, v)")
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{OURS}{LAYER}{block[1]}.self_attn.{part}_proj.{OPENCLIP_FUSED[block[2]]}"] = chunk.clone()
        else:
            raise CheckpointError(f"unknown OpenCLIP text key {key!r} (expected OpenCLIP's own names, e.g. "
                                  "'transformer.resblocks.0.ln_1.weight', with 'cond_stage_model.model.' stripped)")
    return out, ignored


def flat_clip_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x text keys saved without transformers' `text_model.` level (`transformer.embeddings.*`,
    `transformer.encoder.layers.*`, `transformer.final_layer_norm.*`: NAI-derived files and their merges)
    -> ours; text keys already in our layout are returned unchanged."""
    if any(k.startswith(OURS) for k in sd):
        return sd
    flat = "transformer."
    return {OURS + k[len(flat):] if k.startswith(flat) else k: v for k, v in sd.items()}


def ours_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our text weights -> SD 2.x OpenCLIP keys (fused q/k/v); the inverse of openclip_to_ours
    except the unused text_projection / logit_scale, which we do not hold."""
    top = {ours: theirs for theirs, ours in OPENCLIP_TOP.items()}
    block_names = {ours: theirs for theirs, ours in OPENCLIP_BLOCK.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        name = key[len(OURS):] if key.startswith(OURS) else None
        block = OURS_BLOCK_KEY.fullmatch(name or "")
        if name in top:
            out[top[name]] = value
        elif block and block[2] in block_names:
            out[f"transformer.resblocks.{block[1]}.{block_names[block[2]]}"] = value
        elif block and (m := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", block[2])):
            qkv.setdefault((block[1], m[2]), {})[m[1]] = value
        else:
            raise CheckpointError(f"text encoder key {key!r} is not one of ours ({OURS}...); cannot write it "
                                  "in the OpenCLIP layout")
    for (i, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise CheckpointError(f"layer {i} has only {sorted(parts)} of the q/k/v {kind}s; all three are needed "
                                  "to build OpenCLIP's fused in_proj")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
    return out


def _family_pad_id(activation: str) -> int:
    # OpenAI CLIP (quick_gelu, SD 1.x) pads with its end token; OpenCLIP (gelu, SD 2.x) with id 0.
    return 49407 if activation == "quick_gelu" else 0


def text_config_from_hf(d: dict, pad_id: int | None = None,
                        where: str = "text_encoder/config.json") -> TextEncoderConfig:
    """A transformers CLIPTextConfig dict (a diffusers folder's text_encoder/config.json) -> our config.

    diffusers folders already drop the layers after the one SD uses, so the output layer is the last
    (-1). Their `pad_token_id` is not the tokenizer's (it reads 1 in the published SD folders), so the
    pad id is `pad_id` when given (take it from the folder's tokenizer) or else the model family's.
    """
    fields = {"vocab_size": "vocab_size", "max_position_embeddings": "max_length", "hidden_size": "width",
              "num_hidden_layers": "layers", "num_attention_heads": "heads", "intermediate_size": "ff_width",
              "hidden_act": "activation"}
    missing = [k for k in fields if k not in d]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; is it a CLIPTextModel config?")
    values = {ours: d[theirs] for theirs, ours in fields.items()}
    if values["activation"] not in ("quick_gelu", "gelu"):
        raise UnsupportedModelError(f"{where}: hidden_act={values['activation']!r}; latentdiff implements "
                                    "'quick_gelu' (SD 1.x) and 'gelu' (SD 2.x)")
    eps = d.get("layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise UnsupportedModelError(f"{where}: layer_norm_eps={eps}; latentdiff's text encoder uses 1e-5 as CLIP does")
    pad = _family_pad_id(values["activation"]) if pad_id is None else pad_id
    return TextEncoderConfig(**values, output_layer=-1, pad_id=pad)


def text_config_to_hf(cfg: TextEncoderConfig) -> dict:
    """Our config -> a CLIPTextConfig dict that transformers' CLIPTextModel loads.

    transformers has no "output layer": like diffusers' SD 2.x folders, the dict keeps only the layers
    up to `cfg.output_layer` (24 layers at -2 become 23); the weights written with it must drop the rest.
    """
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_length,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers + 1 + cfg.output_layer,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ff_width,
        "hidden_act": cfg.activation,
        "layer_norm_eps": 1e-5,
        "projection_dim": cfg.width,
        # The start and end tokens are the last two vocabulary entries; transformers pools at eos.
        "bos_token_id": cfg.vocab_size - 2,
        "eos_token_id": cfg.vocab_size - 1,
        "pad_token_id": cfg.pad_id,
    }


def _shape(sd: dict, key: str) -> torch.Size:
    if OURS + key not in sd:
        raise CheckpointError(f"text encoder lacks {OURS + key!r}; the checkpoint is incomplete or not CLIP")
    return sd[OURS + key].shape


def detect_text_config(sd: dict[str, torch.Tensor], openclip: bool) -> TextEncoderConfig:
    """The text encoder's architecture from tensor shapes. `sd` holds our keys (convert OpenCLIP weights
    first with openclip_to_ours); `openclip` says the checkpoint came in that layout, which fixes what
    shapes cannot tell: the activation, the conditioning layer and the pad id of the model family.

    Head count is not stored in any shape: it is width // 64, the head width of every CLIP text tower SD
    uses (ViT-L/14: 768 = 12 x 64, OpenCLIP ViT-H/14: 1024 = 16 x 64).
    """
    vocab_size, width = _shape(sd, "embeddings.token_embedding.weight")
    block_key = re.compile(re.escape(OURS) + OURS_BLOCK_KEY.pattern)
    indices = {int(m[1]) for key in sd if (m := block_key.fullmatch(key))}
    if not indices or indices != set(range(len(indices))):
        raise CheckpointError(f"text encoder has blocks {sorted(indices)} ({OURS}{LAYER}N.*); "
                              "expected 0..N-1 without gaps")
    # OpenAI CLIP (SD 1.x) conditions on the last layer; SD 2.x on OpenCLIP's penultimate one.
    family = ({"activation": "gelu", "output_layer": -2, "pad_id": 0} if openclip
              else {"activation": "quick_gelu", "output_layer": -1, "pad_id": 49407})
    return TextEncoderConfig(
        vocab_size=vocab_size,
        max_length=_shape(sd, "embeddings.position_embedding.weight")[0],
        width=width,
        layers=len(indices),
        heads=width // 64,
        ff_width=_shape(sd, f"{LAYER}0.mlp.fc1.weight")[0],
        **family,
    )
