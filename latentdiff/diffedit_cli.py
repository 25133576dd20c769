"""`latentdiff diffedit IMAGE --source ... --target ...`: the DiffEdit command (diffedit.py).

Its options are DiffEditRequest's fields under the names diffusers gives them; --from-png replays an
image this command wrote (the options it carries; flags given as well override them).
"""

import argparse
from pathlib import Path

from . import __version__
from .errors import FieldError, InputError

# request field -> flag, for messages
FLAGS = {"image": "IMAGE", "source_prompt": "--source", "target_prompt": "--target",
         "negative_prompt": "--negative-prompt", "steps": "--steps", "cfg_scale": "--cfg-scale",
         "inverse_cfg_scale": "--inverse-cfg-scale", "seed": "--seed", "mask_encode_strength": "--mask-encode-strength",
         "num_maps_per_mask": "--num-maps-per-mask", "mask_thresholding_ratio": "--mask-thresholding-ratio",
         "inpaint_strength": "--inpaint-strength"}
_TYPES = {"steps": int, "seed": int, "num_maps_per_mask": int, "source_prompt": str}


def add_parser(sub) -> None:
    from .cli import _add_model_flags
    from .diffedit import DiffEditRequest
    d = DiffEditRequest()
    p = sub.add_parser("diffedit", help="edit what a target prompt changes in an image, keep the rest (DiffEdit)")
    flag = dict(default=argparse.SUPPRESS)  # left-out flags are absent, so --from-png can fill them
    p.add_argument("image", help="the image to edit")
    p.add_argument("--source", dest="source_prompt", metavar="TEXT", help="what the image shows (required)", **flag)
    p.add_argument("--target", dest="target_prompt", metavar="TEXT", help="what it should show (required)", **flag)
    p.add_argument("-n", "--negative-prompt", help="what to steer away from (default: none)", **flag)
    p.add_argument("--steps", type=int, help=f"DDIM steps of the whole schedule (default: {d.steps})", **flag)
    p.add_argument("--cfg-scale", type=float, help=f"guidance of the mask and the edit (default: {d.cfg_scale:g})",
                   **flag)
    p.add_argument("--inverse-cfg-scale", type=float,
                   help=f"guidance of the inversion (default: {d.inverse_cfg_scale:g})", **flag)
    p.add_argument("--seed", type=int, help="-1 or left out: random (and printed)", **flag)
    p.add_argument("--mask-encode-strength", type=float, help="0..1: how far into the schedule the image is noised "
                                                              f"to find the mask (default: {d.mask_encode_strength})",
                   **flag)
    p.add_argument("--num-maps-per-mask", type=int, help=f"noise draws averaged for the mask "
                                                         f"(default: {d.num_maps_per_mask})", **flag)
    p.add_argument("--mask-thresholding-ratio", type=float, help="the difference map is clamped at this many times "
                                                                 f"its mean (default: {d.mask_thresholding_ratio:g})",
                   **flag)
    p.add_argument("--inpaint-strength", type=float, help=f"0..1: how much of the schedule the edit reruns "
                                                          f"(default: {d.inpaint_strength})", **flag)
    p.add_argument("--save-mask", metavar="PATH", help="also write the mask found (white = edited) to this new PNG")
    p.add_argument("--from-png", metavar="PNG",
                   help="take the DiffEdit options this PNG carries; flags given as well override them")
    p.add_argument("-o", "--outdir", default="outputs", help="output folder, created; files are never overwritten "
                                                             "(default: outputs)")
    _add_model_flags(p)
    p.set_defaults(threads=None, vae_tiling="auto", attention_slice=None, compile=False, offload=False)


def run(args) -> int:
    from .cli import _check_outdir, _pipeline, say
    from .diffedit import FIELD_NAMES, DiffEditRequest, diffedit, infotext_params
    from .images import load_image, save_png
    from .infotext import from_fields
    fields = {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name) and name != "image"}
    if args.from_png:
        fields = _png_fields(args.from_png) | fields
    for name in ("source_prompt", "target_prompt"):
        if name not in fields:
            raise InputError(f"diffedit needs {FLAGS[name]} \"...\": the prompt of what the image "
                             f"{'shows' if name == 'source_prompt' else 'should show'}")
    mask_path = Path(args.save_mask) if args.save_mask else None
    if mask_path is not None and (mask_path.suffix.lower() != ".png" or mask_path.exists()):
        raise InputError(f"--save-mask {mask_path}: " + ("exists; latentdiff never overwrites a file: give a new path"
                                                         if mask_path.exists() else "must be a .png path"))
    outdir = Path(args.outdir)
    _check_outdir(outdir)
    request = _checked(lambda: DiffEditRequest(image=load_image(args.image), **fields).validate())
    pipe = _pipeline(args)
    result = _checked(lambda: diffedit(pipe, request))
    for note in result.notes:
        say(f"note: {note}")
    ran = result.request
    infotext = from_fields(dict(prompt=ran.target_prompt, negative_prompt=ran.negative_prompt, sampler="DDIM",
                                width=result.image.width, height=result.image.height),
                           {**infotext_params(ran), "Model hash": pipe.model_hash,
                            "Model": pipe.source.stem if pipe.source else pipe.config.name,
                            "Version": f"latentdiff {__version__}"})
    path = save_png(result.image, outdir, f"{result.seed}-diffedit", infotext)
    say(f"saved {path} (seed {result.seed})")
    if mask_path is not None:
        say(f"saved mask {save_png(result.mask, mask_path.parent, mask_path.stem)}")
    return 0


def _checked(fn):
    """fn() with a FieldError told as the command line names the field."""
    try:
        return fn()
    except FieldError as e:
        raise InputError(f"{FLAGS.get(e.field, e.field)} {e.problem}") from None


def _png_fields(path: str) -> dict:
    from .diffedit import INFOTEXT_KEYS
    from .infotext import _read_number, parse_parameters, read_png_parameters
    info = parse_parameters(read_png_parameters(path))
    if "DiffEdit source" not in info.params:
        raise InputError(f"--from-png {path}: carries no DiffEdit options (no 'DiffEdit source'); replay it with "
                         f"txt2img or img2img --from-png instead")
    fields = {"target_prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, name in INFOTEXT_KEYS.items():
        if key in info.params:
            kind = _TYPES.get(name, float)
            fields[name] = info.params[key] if kind is str else _read_number(key, info.params[key], kind)
    return fields
