"""The `latentdiff` command: txt2img, img2img, info, convert, samplers."""

import argparse
import json
import logging
import secrets
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, LatentDiffError

DEMO_MODEL = Path(__file__).resolve().parent.parent / "weights" / "demo" / "model.safetensors"
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"single-file checkpoint or diffusers folder (default: the bundled demo "
                                   f"model, {DEMO_MODEL})")
    p.add_argument("--config", help="preset to use instead of detecting the architecture (sd1, sd2-base, sd2-v)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type (SD 2.x 768-v: v)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default: fp16 on CUDA, bf16 on CPUs with AMX / AVX512-BF16, else fp32")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--steps", type=int, help="sampling steps (default: 20, or the model's own default)")
    p.add_argument("--sampler", default="Euler a", help="sampler name as users type it (see `latentdiff samplers`)")
    p.add_argument("--schedule", help="sigma schedule (default: the sampler's own, e.g. karras for 'DPM++ 2M Karras')")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, help="random when omitted (and printed); image i of a batch uses seed+i")
    p.add_argument("--batch-size", type=int, default=1, help="images per sampling run")
    p.add_argument("--n-iter", type=int, default=1, help="number of sampling runs")
    p.add_argument("--clip-skip", type=int, default=1, help="1 = the model's layer, 2 = one earlier, ...")
    p.add_argument("--eta", type=float, help="noise amount for DDIM and ancestral samplers")
    p.add_argument("-o", "--outdir", default="outputs", help="output folder (created; never overwritten)")
    p.add_argument("--prompts-file", help="batch mode: one prompt per line, or JSON lines with per-line options")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_flags(p)
    speed = p.add_argument_group("speed and memory")
    speed.add_argument("--threads", type=int, help="CPU threads (default: as many as there are idle cores when each "
                                                   "generation starts, at most one per physical core)")
    speed.add_argument("--vae-tiling", default="auto", metavar="{auto,on,off}",
                       help="decode/encode the image in overlapping tiles to bound memory (auto: above 1024x1024)")
    speed.add_argument("--attention-slice", type=int, metavar="TOKENS",
                       help="sliced attention: query blocks of this many tokens (e.g. 1024); off by default")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the U-Net (minutes up front; falls back to eager if it fails)")
    speed.add_argument("--offload", action="store_true",
                       help="CUDA: keep the text encoder and VAE in CPU memory except while they run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Stable Diffusion text-to-image and image-to-image.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    t2i = sub.add_parser("txt2img", help="generate images from a prompt")
    _add_generation_flags(t2i)
    t2i.add_argument("-W", "--width", type=int, help="multiple of 8 (default: the model's native size)")
    t2i.add_argument("-H", "--height", type=int, help="multiple of 8 (default: the model's native size)")
    t2i.add_argument("--from-png", help="regenerate the image whose parameters this PNG carries")
    i2i = sub.add_parser("img2img", help="redraw an image guided by a prompt (SDEdit)")
    _add_generation_flags(i2i)
    i2i.add_argument("--init-image", required=True, help="the starting image")
    i2i.add_argument("--strength", type=float, default=0.75, help="0..1: how much to change (1 = ignore the image)")
    info = sub.add_parser("info", help="show a checkpoint's architecture or a PNG's generation parameters")
    info.add_argument("path")
    info.add_argument("--prediction", choices=["eps", "v"])
    conv = sub.add_parser("convert", help="single file <-> diffusers folder")
    conv.add_argument("source", help="a .safetensors/.ckpt file or a diffusers folder")
    conv.add_argument("target", help="*.safetensors -> single file; anything else -> a new diffusers folder")
    conv.add_argument("--config", help="preset instead of detection (single-file sources)")
    conv.add_argument("--prediction", choices=["eps", "v"])
    conv.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (e.g. fp16 halves the size)")
    sub.add_parser("samplers", help="list sampler names and schedules")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .memory import use_huge_pages
    use_huge_pages()  # before any tensor exists: PyTorch reads the switch at its first allocation
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except (LatentDiffError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"latentdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentdiff: interrupted", file=sys.stderr)
        return 130


# -- commands --------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def _pipeline(args, device=None):
    from .threads import set_threads
    from .pipeline import Pipeline
    from .tiling import check_tiling_mode
    check_tiling_mode(args.vae_tiling)  # bad switches fail before the model loads
    set_threads(args.threads)
    model = args.model or DEMO_MODEL
    if not Path(model).exists():
        hint = "pass --model PATH" if args.model else "the bundled demo model is missing: pass --model PATH"
        raise InputError(f"model not found: {model} ({hint})")
    return Pipeline.from_pretrained(model, config=args.config, prediction=args.prediction,
                                    device=args.device or device, dtype=_torch_dtype(args.dtype),
                                    vae_tiling=args.vae_tiling, attention_slice=args.attention_slice,
                                    compile=args.compile, offload=args.offload, threads=args.threads)


def _jobs(args) -> list[dict]:
    """The generation jobs: one per prompt line in batch mode, else the command line's own prompt."""
    if not args.prompts_file:
        if not args.prompt:
            raise InputError("no prompt: give one as the first argument (or use --prompts-file / --from-png)")
        return [{"prompt": args.prompt}]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise InputError(f"--prompts-file {path}: no such file")
    jobs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                job = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--prompts-file {path}:{n}: invalid JSON ({e.msg})") from None
            unknown = set(job) - set(JOB_KEYS)
            if unknown or "prompt" not in job:
                raise InputError(f"--prompts-file {path}:{n}: needs a 'prompt'; allowed keys {sorted(JOB_KEYS)}, "
                                 f"unknown {sorted(unknown)}")
            for key, value in job.items():
                expected = (int, float) if JOB_KEYS[key] is float else JOB_KEYS[key]
                if not isinstance(value, expected) or isinstance(value, bool):
                    raise InputError(f"--prompts-file {path}:{n}: {key!r} must be {TYPE_NAMES[JOB_KEYS[key]]}, "
                                     f"not {json.dumps(value)}")
        else:
            job = {"prompt": line}
        jobs.append(job | {"line": n})
    if not jobs:
        raise InputError(f"--prompts-file {path}: no prompts in it")
    return jobs


# the per-line options of a JSON prompts file, with the type each value must have
JOB_KEYS = {"prompt": str, "negative_prompt": str, "steps": int, "sampler": str, "schedule": str, "cfg_scale": float,
            "seed": int, "width": int, "height": int, "batch_size": int, "n_iter": int, "clip_skip": int,
            "strength": float}
TYPE_NAMES = {str: "a string", int: "an integer", float: "a number"}


def say(line: str) -> None:
    """Print `line` in one write. Under accelerate several processes share stdout, and print()'s separate
    write of the newline lets another process's line land in between, gluing two lines together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _generate(args, image=None) -> int:
    from .images import fit_to_multiple, format_parameters, save_png
    from .loader import model_hash

    jobs = _jobs(args)
    batch_mode = args.prompts_file is not None
    device, tag = None, ""
    if batch_mode:  # under `accelerate launch`, each process takes its share of the prompts (and its own GPU)
        import torch
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        # PartialState splits work across CPU processes (gloo) only when told cpu=True; it does not read
        # ACCELERATE_USE_CPU itself, and without a GPU the processes would each run every prompt.
        cpu = (args.device or "").startswith("cpu") or parse_flag_from_env("ACCELERATE_USE_CPU") \
            or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        if state.num_processes > 1:
            device, tag = state.device, f"[process {state.process_index + 1}/{state.num_processes}] "
        with state.split_between_processes(jobs) as mine:
            jobs = list(mine)
    pipe = _pipeline(args, device)
    if image is not None and min(image.size) >= pipe.size_multiple():  # smaller ones fail the size check
        fitted = fit_to_multiple(image, pipe.size_multiple())
        if fitted.size != image.size:
            say(f"note: --init-image cropped from {image.width}x{image.height} to {fitted.width}x{fitted.height} "
                f"(sides must be multiples of {pipe.size_multiple()})")
        image = fitted
    model_path = Path(args.model or DEMO_MODEL)
    short_hash = model_hash(model_path)
    outdir = Path(args.outdir)
    for job in jobs:
        opts = {k.replace("-", "_"): getattr(args, k.replace("-", "_"), None) for k in JOB_KEYS} | job
        steps = 20 if opts["steps"] is None else opts["steps"]
        if opts["n_iter"] < 1:
            raise InputError(f"--n-iter must be at least 1, not {opts['n_iter']}")
        base_seed = opts["seed"] if opts["seed"] is not None else secrets.randbelow(2**32)
        for it in range(opts["n_iter"]):
            seed = base_seed + it * opts["batch_size"]
            stems = [f"{job['line']:05d}-{it * opts['batch_size'] + i:03d}" for i in range(opts["batch_size"])] \
                if batch_mode else None
            if stems and all((outdir / f"{s}.png").exists() for s in stems):
                say(f"{tag}skip (exists): {outdir / stems[0]}.png ...")
                continue
            common = dict(steps=steps, sampler=opts["sampler"], schedule=opts["schedule"], cfg_scale=opts["cfg_scale"],
                          seed=seed, batch_size=opts["batch_size"], clip_skip=opts["clip_skip"], eta=args.eta,
                          progress=not args.quiet)
            if image is None:
                result = pipe.txt2img(opts["prompt"], opts["negative_prompt"] or "", width=opts["width"],
                                      height=opts["height"], **common)
            else:
                result = pipe.img2img(image, opts["prompt"], opts["negative_prompt"] or "", strength=opts["strength"],
                                      **common)
            for i, (img, img_seed) in enumerate(zip(result.images, result.seeds)):
                params = {"Steps": steps, "Sampler": opts["sampler"], "Schedule type": opts["schedule"],
                          "CFG scale": opts["cfg_scale"], "Seed": img_seed, "Size": f"{img.width}x{img.height}",
                          "Model hash": short_hash, "Model": model_path.stem,
                          "Denoising strength": opts["strength"] if image is not None else None,
                          "Clip skip": opts["clip_skip"] if opts["clip_skip"] != 1 else None,
                          "Eta": args.eta, "Version": f"latentdiff {__version__}"}
                text = format_parameters(opts["prompt"], opts["negative_prompt"] or "",
                                         {k: v for k, v in params.items() if v is not None})
                path = save_png(img, outdir, stems[i] if stems else f"{img_seed}", text)
                say(f"{tag}saved {path} (seed {img_seed})")
            for note in result.notes:
                say(f"note: {note}")
    return 0


def cmd_txt2img(args) -> int:
    if args.from_png:
        _apply_png(args)
    return _generate(args)


def _apply_png(args) -> None:
    """Fill the flags from a PNG's parameters so the same image is generated again."""
    from .images import parse_parameters, read_png_parameters
    text = read_png_parameters(args.from_png)
    if not text:
        raise InputError(f"--from-png {args.from_png}: the PNG carries no 'parameters' text chunk")
    prompt, negative, params = parse_parameters(text)
    args.prompt, args.negative_prompt = prompt, negative
    width, height = (int(v) for v in params["Size"].split("x"))
    args.width, args.height = width, height
    args.steps, args.sampler, args.seed = int(params["Steps"]), params["Sampler"], int(params["Seed"])
    args.schedule = params.get("Schedule type")
    args.cfg_scale = float(params["CFG scale"])
    args.clip_skip = int(params.get("Clip skip", 1))
    args.eta = float(params["Eta"]) if "Eta" in params else None
    args.batch_size, args.n_iter = 1, 1


def cmd_img2img(args) -> int:
    from .images import load_image
    return _generate(args, load_image(args.init_image))  # cropped to the model's size multiple once loaded


def cmd_info(args) -> int:
    path = Path(args.path)
    if path.suffix.lower() == ".png":
        from .images import read_png_parameters
        text = read_png_parameters(path)
        if text is None:
            raise InputError(f"{path}: no generation parameters in this PNG")
        print(text)
        return 0
    from .loader import load_model, model_hash
    model = load_model(path, prediction=args.prediction, device="cpu")
    cfg = model.config
    family = "SD 2.x (OpenCLIP)" if cfg.text.activation == "gelu" else "SD 1.x (CLIP ViT-L)"
    print(f"model:       {path}")
    print(f"family:      {family}, {cfg.prediction}-prediction, native {cfg.resolution}px")
    for name, count in model.parameter_counts().items():
        print(f"{name + ':':13}{count / 1e6:.1f}M parameters")
    print(f"dtype:       {str(model.dtype).replace('torch.', '')}")
    print(f"hash:        {model_hash(path)}")
    return 0


def cmd_convert(args) -> int:
    from .loader import load_model, save_model
    model = load_model(args.source, config=args.config, prediction=args.prediction, dtype=_torch_dtype(args.dtype))
    print(f"wrote {save_model(model, args.target)}")
    return 0


def cmd_samplers(args) -> int:
    from .sampling import sampler_table
    from .schedules import schedule_names
    print("samplers (name: default schedule):")
    for name, schedule in sampler_table():
        print(f"  {name}: {schedule}")
    print("schedules: " + ", ".join(schedule_names()))
    return 0


COMMANDS = {"txt2img": cmd_txt2img, "img2img": cmd_img2img, "info": cmd_info, "convert": cmd_convert,
            "samplers": cmd_samplers}

if __name__ == "__main__":
    sys.exit(main())
