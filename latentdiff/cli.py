"""The `latentdiff` command: txt2img, img2img, info, convert, samplers, diffedit, serve (server/command.py)
and train (train/personal_cli.py)."""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from . import __version__, diffedit_cli
from .errors import InputError, LatentDiffError
from .jobs import Job, command_jobs, for_the_command_line

class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder (default: the "
                                   "bundled demo model)")
    p.add_argument("--vae", help="a VAE to use instead of the model's own: a VAE file (.safetensors/.pt/.ckpt, e.g. "
                                 "vae-ft-mse-840000-ema-pruned.safetensors), a whole checkpoint (its VAE) or a "
                                 "diffusers AutoencoderKL folder")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="a folder of textual-inversion embeddings (.pt/.bin/.safetensors, subfolders too): a file's "
                        "name without its extension, used as a word in a prompt, stands for it (default: none)")
    p.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="PATH_OR_NAME[:WEIGHT]",
                   help="a LoRA / LyCORIS file (or its name in --lora-dir) merged into the model at WEIGHT (default "
                        "1); repeatable")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="the folder (subfolders too) where prompt tags <lora:NAME:WEIGHT> and --lora NAME find "
                        "NAME.safetensors/.pt/.ckpt, as A1111's models/Lora (default: none)")
    p.add_argument("--config", help="preset to use instead of detecting the architecture (sd1, sd2-base, sd2-v)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type (SD 2.x 768-v: v)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="fp32, fp16 or bf16 (default: fp16 on CUDA, bf16 on CPUs with AMX / AVX512-BF16, "
                                   "else fp32)")


def _lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]`: a trailing ":number" is the weight (so "C:\\x.safetensors" stays a path)."""
    path, _, weight = value.rpartition(":")
    try:
        return (path, float(weight)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def _add_generation_flags(p: argparse.ArgumentParser, img2img: bool) -> None:
    from .request import DEFAULTS, RESIZE_MODES
    # Defaults live in GenerationRequest; a flag left out is absent here, so --from-png can tell it from one given.
    flag = dict(default=argparse.SUPPRESS)
    p.add_argument("prompt", nargs="?", help="what to draw", **flag)
    p.add_argument("-n", "--negative-prompt", help="what to steer away from (default: none)", **flag)
    p.add_argument("-W", "--width", type=int, help="image width, a multiple of 64 between 64 and 4096 (default: " +
                   ("the init image's, cropped to a multiple of 64)" if img2img else "the model's native size)"), **flag)
    p.add_argument("-H", "--height", type=int, help="image height, as --width", **flag)
    p.add_argument("--steps", type=int, help=f"sampling steps (default: {DEFAULTS.steps})", **flag)
    p.add_argument("--sampler", help=f"sampler name as A1111 and ComfyUI users type it; `latentdiff samplers` "
                                     f"lists them (default: {DEFAULTS.sampler})", **flag)
    p.add_argument("--schedule", help="sigma schedule (default: the sampler's own, e.g. karras for "
                                      "'DPM++ 2M Karras')", **flag)
    p.add_argument("--cfg-scale", type=float, help=f"classifier-free guidance scale, 1 = off "
                                                   f"(default: {DEFAULTS.cfg_scale:g})", **flag)
    p.add_argument("--seed", type=int, help="-1 or left out: random (and printed); image i of a batch uses seed+i",
                   **flag)
    p.add_argument("--batch-size", type=int, help=f"images per sampling run (default: {DEFAULTS.batch_size})",
                   **flag)
    p.add_argument("--n-iter", type=int, help=f"number of sampling runs (default: {DEFAULTS.n_iter})", **flag)
    p.add_argument("--clip-skip", type=int, help="1 = the model's text layer, 2 = one earlier, ... (default: 1)",
                   **flag)
    p.add_argument("--eta", type=float, help="noise amount of DDIM, the ancestral and the SDE samplers "
                                             "(default: the sampler's own)", **flag)
    p.add_argument("--from-png", help="take the parameters this PNG carries; flags given as well override them")
    if not img2img:
        _add_hires_flags(p.add_argument_group("hires fix (A1111's: generate, upscale, refine at the larger size)"),
                         flag)
    if img2img:
        p.add_argument("--init-image", help="the starting image (required)")
        p.add_argument("--strength", type=float, help=f"0..1: how much to change, 1 = ignore the image "
                                                      f"(default: {DEFAULTS.strength})", **flag)
        p.add_argument("--resize-mode", choices=RESIZE_MODES, metavar="MODE",
                       help=f"with -W/-H: {', '.join(RESIZE_MODES)} (default: {DEFAULTS.resize_mode})", **flag)
        p.add_argument("--image-cfg-scale", type=float, help="InstructPix2Pix checkpoints: how closely to keep to "
                                                             "the init image, 1 = off (default: 1.5)", **flag)
        _add_inpaint_flags(p.add_argument_group("inpainting and outpainting"), flag)
    p.add_argument("-o", "--outdir", default="outputs", help="output folder, created; files are never overwritten "
                                                             "(default: outputs)")
    p.add_argument("--prompts-file", help="batch mode: one prompt per line, or JSON lines with per-line options; "
                                          "a rerun skips the images already made")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_flags(p)
    speed = p.add_argument_group("speed and memory")
    speed.add_argument("--threads", type=int, help="CPU threads (default: as many as there are idle cores when each "
                                                   "generation starts, at most one per physical core)")
    speed.add_argument("--vae-tiling", default="auto", metavar="{auto,on,off}",
                       help="decode/encode the image in overlapping tiles to bound memory (default: auto, which "
                            "tiles above 1024x1024)")
    speed.add_argument("--attention-slice", type=int, metavar="TOKENS",
                       help="sliced attention: query blocks of this many tokens, e.g. 1024 (default: off)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the U-Net (minutes up front; falls back to eager if it fails)")
    speed.add_argument("--offload", action="store_true",
                       help="CUDA: keep the text encoder and VAE in CPU memory except while they run")


def _add_hires_flags(p, flag: dict) -> None:
    from .hires import UPSCALERS
    from .request import DEFAULTS
    p.add_argument("--hr-scale", type=float, help=f"turns the hires fix on: upscale by this factor (default "
                                                  f"{DEFAULTS.hr_scale:g} when --hr-resize-x/-y turn it on)", **flag)
    p.add_argument("--hr-resize-x", type=int, metavar="WIDTH", help="turns the hires fix on: upscale to this width "
                   "instead (alone: the height keeps the aspect ratio; with --hr-resize-y: cover, then crop)", **flag)
    p.add_argument("--hr-resize-y", type=int, metavar="HEIGHT", help="as --hr-resize-x, for the height", **flag)
    p.add_argument("--hr-upscaler", metavar="NAME", help=f"{', '.join(UPSCALERS)} (default: "
                                                         f"{DEFAULTS.hr_upscaler})", **flag)
    p.add_argument("--hr-steps", type=int, dest="hr_second_pass_steps", metavar="STEPS",
                   help="steps the second pass runs (default 0: as --steps)", **flag)
    p.add_argument("--denoising-strength", type=float, dest="strength", metavar="STRENGTH",
                   help=f"how much the second pass changes, 0..1 (default: {DEFAULTS.strength:g}, A1111's API "
                        f"default; its web UI starts at 0.7)", **flag)
    p.add_argument("--hr-sampler", dest="hr_sampler_name", metavar="NAME",
                   help="the second pass's sampler (default: --sampler)", **flag)
    p.add_argument("--hr-schedule", dest="hr_scheduler", metavar="NAME",
                   help="the second pass's sigma schedule (default: --schedule if given, else the sampler's own)",
                   **flag)
    p.add_argument("--hr-prompt", help="the second pass's prompt (default: the prompt)", **flag)
    p.add_argument("--hr-negative-prompt", help="the second pass's negative prompt (default: the negative prompt)",
                   **flag)


def _add_inpaint_flags(p, flag: dict) -> None:
    from .inpaint import MASKED_CONTENT
    from .request import DEFAULTS
    p.add_argument("--mask", help="repaint where this image is white (grey: partly), keep where black; `alpha`: "
                                  "repaint where the init image is transparent", **flag)
    p.add_argument("--mask-blur", dest="mask_blur", type=int, metavar="PX",
                   help=f"blur the mask's edge by this many px (default: {DEFAULTS.mask_blur})", **flag)
    p.add_argument("--invert-mask", dest="inpainting_mask_invert", action="store_true",
                   help="repaint the black part instead", **flag)
    p.add_argument("--masked-content", dest="inpainting_fill", choices=MASKED_CONTENT, metavar="CONTENT",
                   help=f"what the repainted area starts from: {', '.join(MASKED_CONTENT)} "
                        f"(default: {DEFAULTS.inpainting_fill})", **flag)
    p.add_argument("--only-masked", dest="inpaint_full_res", action="store_true",
                   help="repaint only the region around the mask, at the full image size, and paste it back", **flag)
    p.add_argument("--mask-padding", dest="inpaint_full_res_padding", type=int, metavar="PX",
                   help=f"with --only-masked: px around the mask (default: {DEFAULTS.inpaint_full_res_padding})",
                   **flag)
    p.add_argument("--outpaint", metavar="SIDE:PX,...", help="extend the canvas and paint the new border, e.g. "
                                                             "left:64,right:64 (sides left, right, top, bottom)",
                   **flag)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="latentdiff", description="Stable Diffusion text-to-image and image-to-image.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    _add_generation_flags(sub.add_parser("txt2img", help="generate images from a prompt"), img2img=False)
    _add_generation_flags(sub.add_parser("img2img", help="redraw an image guided by a prompt (SDEdit)"), img2img=True)
    info = sub.add_parser("info", help="show a checkpoint's architecture or a PNG's generation parameters")
    info.add_argument("path", help="a checkpoint file, a diffusers folder or a PNG")
    info.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type")
    conv = sub.add_parser("convert", help="single file <-> diffusers folder")
    conv.add_argument("source", help="a .safetensors/.ckpt file or a diffusers folder")
    conv.add_argument("target", help="*.safetensors -> single file; anything else -> a new diffusers folder")
    conv.add_argument("--config", help="preset instead of detection (single-file sources)")
    conv.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type")
    conv.add_argument("--dtype", metavar="{fp32,fp16,bf16}",
                      help="cast the weights (e.g. fp16 halves the size); default: keep the source's dtypes")
    sub.add_parser("samplers", help="list sampler names and schedules")
    diffedit_cli.add_parser(sub)
    from .server.command import add_serve_flags
    serve = sub.add_parser("serve", help="an A1111-compatible HTTP API (/sdapi/v1) and a web page")
    add_serve_flags(serve)
    _add_model_flags(serve)
    sub.add_parser("train", help="teach a model a concept: train embedding|lora|dreambooth (see `train --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .memory import use_huge_pages
    use_huge_pages()  # before any tensor exists: PyTorch reads the switch at its first allocation
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # `latentdiff train embedding|lora|dreambooth ...`: its own parser, in train/
        from .train.personal_cli import main as train_main
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a reader gone away (`| head`) is seen below, not at exit
        return status
    except BrokenPipeError:
        # stdout's reader has gone (`latentdiff info X | head -1`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (LatentDiffError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"latentdiff: error: {for_the_command_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentdiff: interrupted", file=sys.stderr)
        return 130


def say(line: str) -> None:
    """Print `line` in one write. Under accelerate several processes share stdout, and print()'s separate
    write of the newline lets another process's line land in between, gluing two lines together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- generation ----------------------------------------------------------------------------------------

def _check_outdir(outdir: Path) -> None:
    """The output folder can be made (save_png makes it) or written, checked before any model work and without
    creating anything yet: a run that fails leaves no trace."""
    existing = next(p for p in (outdir.absolute(), *outdir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"-o/--outdir {outdir}: {existing} is a file, not a folder; choose another folder")
    try:  # a real probe: permissions, read-only mounts and special filesystems all answer it
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise InputError(f"-o/--outdir {outdir}: cannot write in {existing} ({e.strerror}); choose a writable "
                         f"folder") from None


def _pipeline(args, device=None):
    from .pipeline import Pipeline
    from .threads import set_threads
    from .tiling import check_tiling_mode
    check_tiling_mode(args.vae_tiling)  # bad switches fail before the model loads
    set_threads(args.threads)
    if args.model and not Path(args.model).expanduser().exists():
        raise InputError(f"model not found: {args.model} (pass --model PATH)")
    if args.vae and not Path(args.vae).expanduser().exists():
        raise InputError(f"VAE not found: {args.vae} (pass --vae PATH)")
    if args.embeddings_dir and not Path(args.embeddings_dir).expanduser().is_dir():
        raise InputError(f"embeddings folder not found: {args.embeddings_dir} (pass --embeddings-dir DIR)")
    if args.lora_dir and not Path(args.lora_dir).expanduser().is_dir():
        raise InputError(f"LoRA folder not found: {args.lora_dir} (pass --lora-dir DIR)")
    for path, _ in args.lora:
        if not Path(path).expanduser().is_file() and not args.lora_dir:
            raise InputError(f"LoRA file not found: {path} (pass --lora PATH[:WEIGHT], or a name with --lora-dir)")
    return Pipeline.from_pretrained(args.model, config=args.config, prediction=args.prediction, vae=args.vae,
                                    loras=args.lora, lora_dir=args.lora_dir,
                                    device=args.device or device, dtype=args.dtype,
                                    vae_tiling=args.vae_tiling, attention_slice=args.attention_slice,
                                    compile=args.compile, offload=args.offload, threads=args.threads,
                                    embeddings_dir=args.embeddings_dir and Path(args.embeddings_dir).expanduser())


def _split_between_processes(jobs: list[Job], args) -> tuple[list[Job], object, str]:
    """Under `accelerate launch`, each process takes its share of the jobs (and its own GPU)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    # PartialState splits work across CPU processes (gloo) only when told cpu=True; it does not read
    # ACCELERATE_USE_CPU itself, and without a GPU the processes would each run every prompt.
    cpu = (args.device or "").startswith("cpu") or parse_flag_from_env("ACCELERATE_USE_CPU") \
        or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes == 1:
        return jobs, None, ""
    with state.split_between_processes(jobs) as mine:
        return list(mine), state.device, f"[process {state.process_index + 1}/{state.num_processes}] "


def _generate(args, mode: str) -> int:
    import secrets

    from .images import save_png
    from .request import RANDOM_SEED

    jobs, notes = command_jobs(args, mode)
    for note in notes:
        say(f"note: {note}")
    outdir = Path(args.outdir)
    _check_outdir(outdir)
    device, tag = None, ""
    if args.prompts_file:
        jobs, device, tag = _split_between_processes(jobs, args)
    pipe = _pipeline(args, device)
    for job in jobs:
        request = job.request
        if request.seed == RANDOM_SEED:  # chosen once, so that iteration k starts at seed + k * batch_size
            request = request.replace(seed=secrets.randbelow(2**32))
        for it in range(request.n_iter):
            first = it * request.batch_size
            run = request.replace(n_iter=1, seed=request.seed + first)
            stems = [f"{job.stem}-{first + i:03d}" for i in range(len(run.prompts))] if job.stem else None
            if stems and all((outdir / f"{s}.png").exists() for s in stems):
                say(f"{tag}skip (exists): {outdir / stems[0]}.png ...")
                continue
            result = job.check(pipe.generate, run, progress=not args.quiet)
            for note in result.notes:
                say(f"note: {note}")
            for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
                if stems and (outdir / f"{stems[i]}.png").exists():
                    continue
                path = save_png(image, outdir, stems[i] if stems else f"{seed}", pipe.infotext(result.request, i))
                say(f"{tag}saved {path} (seed {seed})")
    return 0


def _torch_dtype(name):
    from .devices import parse_dtype
    return parse_dtype(name) if name else None


def cmd_txt2img(args) -> int:
    return _generate(args, "txt2img")


def cmd_img2img(args) -> int:
    return _generate(args, "img2img")


def cmd_info(args) -> int:
    path = Path(args.path)
    if path.suffix.lower() == ".png":
        from .infotext import read_png_parameters
        print(read_png_parameters(path))
        return 0
    from .formats.families import FAMILY_NAMES, text_tower_name
    from .loader import describe_model, model_hash
    summary = describe_model(path, prediction=args.prediction)  # shapes only: no weights are read
    cfg = summary.config
    print(f"model:       {path}")
    print(f"family:      {FAMILY_NAMES[cfg.family]}, {cfg.prediction}-prediction, native {cfg.resolution}px")
    if cfg.unet.in_channels != cfg.unet.out_channels:
        from .conditioning import concat_family
        from .inpaint import INPAINT_EXTRA_CHANNELS
        from .instruct import is_instruct_model
        usable = ("edits with img2img" if is_instruct_model(cfg) else "img2img --mask"
                  if cfg.unet.in_channels - cfg.unet.out_channels == INPAINT_EXTRA_CHANNELS else "cannot generate yet")
        print(f"variant:     {concat_family(cfg.unet.in_channels, cfg.unet.out_channels)} ({usable})")
    print(f"text:        {text_tower_name(cfg.text)}")
    for name, count in summary.parameters.items():
        print(f"{name + ':':13}{count / 1e6:.1f}M parameters")
    names = {name: "/".join(str(d).removeprefix("torch.") for d in found) or "none"
             for name, found in summary.dtypes.items()}
    one = set(names.values())
    stored = one.pop() if len(one) == 1 and "/" not in names["unet"] else \
        "mixed: " + ", ".join(f"{name} {dtypes}" for name, dtypes in names.items())
    print(f"stored as:   {stored}")
    print(f"hash:        {model_hash(path)}")
    return 0


def cmd_convert(args) -> int:
    from .loader import convert
    target = Path(args.target)
    if target.exists():  # the library refuses too; this names the command-line argument
        raise InputError(f"convert: TARGET {target} already exists; latentdiff never overwrites a model: "
                         "give a new TARGET path")
    written = convert(args.source, target, config=args.config, prediction=args.prediction,
                      dtype=_torch_dtype(args.dtype))
    print(f"wrote {written}")
    return 0


def cmd_samplers(args) -> int:
    from .sampling import sampler_table
    from .schedules import schedule_names
    print("samplers (name: default schedule):")
    for name, schedule in sampler_table():
        print(f"  {name}: {schedule}")
    print("schedules: " + ", ".join(schedule_names()))
    return 0


def cmd_serve(args) -> int:
    from .server.command import serve
    return serve(args)


COMMANDS = {"txt2img": cmd_txt2img, "img2img": cmd_img2img, "info": cmd_info, "convert": cmd_convert,
            "samplers": cmd_samplers, "diffedit": diffedit_cli.run, "serve": cmd_serve}

if __name__ == "__main__":
    sys.exit(main())
