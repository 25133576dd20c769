"""A small LoRA and a textual-inversion embedding for the bundled demo model, for the README's add-ons example:

    python tools/make_demo_addons.py addons
    -> addons/Lora/demo_style.safetensors, addons/embeddings/redcircle.safetensors

`redcircle` holds the demo text encoder's own token vectors of "big red circle" (three vectors), so the word
`redcircle` in a prompt stands for those three words. `demo_style` is a seeded random rank-4 kohya LoRA of the
U-Net's cross-attention keys and values: it changes the picture visibly and teaches nothing. Existing files
are never overwritten.
"""

import argparse
from pathlib import Path

import torch

from latentdiff.checkpoint import save_safetensors
from latentdiff.errors import LatentDiffError
from latentdiff.formats.lora import layer_names
from latentdiff.loader import load_model
from latentdiff.resources import demo_model

RANK = 4


def make_addons(folder) -> tuple[Path, Path]:
    """Write the two files under `folder` (Lora/ and embeddings/, created); returns their paths."""
    folder = Path(folder)
    model = load_model(demo_model())
    (folder / "Lora").mkdir(parents=True, exist_ok=True)
    (folder / "embeddings").mkdir(exist_ok=True)
    table = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight
    ids = model.tokenizer.token_ids(["big red circle"])[0]
    embedding = save_safetensors({"emb_params": table[ids].detach().float().clone()},
                                 folder / "embeddings" / "redcircle.safetensors")
    params, sd = dict(model.named_parameters()), {}
    gen = torch.Generator().manual_seed(0)
    for dotted, ours in layer_names(model).items():
        if dotted.startswith("unet.") and dotted.endswith(("attn2.to_k", "attn2.to_v")):
            out, inp = params[ours].shape
            kohya = "lora_unet_" + dotted[len("unet."):].replace(".", "_")
            sd[f"{kohya}.lora_down.weight"] = torch.randn(RANK, inp, generator=gen) / inp ** 0.5
            sd[f"{kohya}.lora_up.weight"] = torch.randn(out, RANK, generator=gen) * 0.5
            sd[f"{kohya}.alpha"] = torch.tensor(float(RANK))
    lora = save_safetensors(sd, folder / "Lora" / "demo_style.safetensors")
    return lora, embedding


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write Lora/ and embeddings/")
    try:
        written = make_addons(p.parse_args(argv).folder)
    except LatentDiffError as e:
        print(f"make_demo_addons: error: {e}")
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
