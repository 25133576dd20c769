"""`latentdiff train embedding|lora|dreambooth IMAGES -o OUT.safetensors [options]` (also
`python -m latentdiff.train embedding ...`): teach a model a new concept from a folder of its pictures.

Runs on one CPU or GPU as is, and data-parallel under `accelerate launch --multi_gpu --num_processes N -m
latentdiff.train embedding ...` (CPU processes on a machine without GPUs). Defaults follow the papers and
the common tools (A1111 for textual inversion, diffusers' scripts for LoRA and DreamBooth), which are tuned
for SD 1.5 at 512 px; the small bundled model learns faster with other settings (benchmarks/personalisation.md).
"""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from ..errors import LatentDiffError
from .personal import Settings

METHODS = ("embedding", "lora", "dreambooth")
# (steps, learning rate) per method: A1111 / Gal et al. 5e-3; diffusers' LoRA scripts 1e-4; its
# train_dreambooth.py 5e-6 for 400 steps
DEFAULTS = {"embedding": (3000, 5e-3), "lora": (500, 1e-4), "dreambooth": (400, 5e-6)}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command (and its subcommands: they share the class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    helps = {"embedding": "textual inversion: a new word's embedding, the model frozen (.safetensors, emb_params)",
             "lora": "LoRA adapters on the U-Net (and optionally text encoder), kohya .safetensors",
             "dreambooth": "fine-tune the U-Net with prior preservation, a whole single-file checkpoint"}
    for method in METHODS:
        p = sub.add_parser(method, help=helps[method])
        steps, lr = DEFAULTS[method]
        p.add_argument("images", type=Path, help="folder of the concept's images; NAME.txt beside NAME.png is its "
                                                 "caption, in which [name] stands for the token")
        p.add_argument("-o", "--output", type=Path, required=True, help="the result, NAME.safetensors (never "
                       "overwritten); NAME-training/ beside it holds logs and checkpoints, NAME-samples.png a grid")
        p.add_argument("--model", type=Path, help="base model: a single file or diffusers folder (default: the "
                                                  "bundled demo model)")
        token_help = {"embedding": "the new word (default: the output's file name, which A1111 and ComfyUI take "
                                   "as the trigger word)",
                      "lora": "the trigger word [name] stands for in captions (default: the output's file name)",
                      "dreambooth": "the rare identifier, e.g. sks; captions say 'a [name]' = 'a sks CLASS'"}
        p.add_argument("--token", help=token_help[method], required=method == "dreambooth")
        p.add_argument("--template", help="caption template: [name] -> the token, [filewords] -> the .txt caption "
                                          "(default: [filewords] with .txt files, else 'a photo of [name]')")
        p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
        p.add_argument("--lr", type=float, default=lr, help=f"learning rate, constant (default: {lr:g})")
        p.add_argument("--batch-size", type=int, default=1, help="images per step, over all processes (default: 1)")
        p.add_argument("--seed", type=int, default=0, help="seeds data order, noise and initialisation (default: 0)")
        p.add_argument("--noise-offset", type=float, default=0.0,
                       help="offset noise (default: 0; the bundled model was trained with 0.4)")
        p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default: 100)")
        p.add_argument("--log-every", type=int, default=10, help="loss log interval in steps (default: 10)")
        p.add_argument("--sample-prompt", action="append", default=[], dest="sample_prompts",
                       help="a prompt for the sample grid, repeatable (default: the instance captions)")
        p.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the grid (and class images)")
        p.add_argument("--resume", action="store_true", help="continue the run of this output from its checkpoint")
        p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                       help="autocast dtype (default: fp16 on CUDA, bf16 on CPU)")
        p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
        p.add_argument("--threads", type=int, help="torch CPU threads per process")
        p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
        if method == "embedding":
            p.add_argument("--init-word", default="*", help="the vectors start as this word's (default: *, as A1111)")
            p.add_argument("--vectors", type=int, default=1, help="vectors per token (default: 1)")
        elif method == "lora":
            p.add_argument("--rank", type=int, default=4, help="adapter rank (default: 4)")
            p.add_argument("--alpha", type=float, help="scale alpha / rank (default: alpha = rank)")
            p.add_argument("--targets", default="attention",
                           help="comma list of attention, ff, conv, text (default: attention)")
        else:
            p.add_argument("--class-word", required=True, help="the subject's class, e.g. dog, star")
            p.add_argument("--class-prompt", help="prompt of the class images (default: 'a CLASS')")
            p.add_argument("--class-prompts", type=Path, metavar="FILE",
                           help="several class prompts, one a line (kohya's several regularisation sets): the class "
                                "images are shared out among them in turn (default: the one --class-prompt)")
            p.add_argument("--class-images", type=int, default=100, help="prior-preservation images (default: 100)")
            p.add_argument("--prior-weight", type=float, default=1.0,
                           help="weight of the prior-preservation loss; 0 = off (default: 1)")
            p.add_argument("--prior-batch", type=int, default=1,
                           help="class images per instance image in each step (default: 1)")
            p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the text encoder too")
            p.add_argument("--caption-dropout", type=float, default=0.0,
                           help="share of samples trained on the empty prompt, which classifier-free guidance "
                                "subtracts (default: 0)")
            p.add_argument("--ema-decay", type=float, default=0.0,
                           help="write the moving average of the weights at this decay, starting from the base "
                                "weights, e.g. 0.995 (default: 0, off)")
            p.add_argument("--conv-lr-scale", type=float, default=1.0,
                           help="learning rate of the U-Net outside its transformer blocks (ResNet blocks, "
                                "convolutions) as a multiple of --lr (default: 1)")
            p.add_argument("--train-identifier", action="store_true",
                           help="also learn the identifier's token embedding (pivotal tuning), written into the "
                                "checkpoint's token table")
            p.add_argument("--identifier-lr", type=float, default=5e-3,
                           help="learning rate of the identifier's embedding (default: 5e-3)")
            p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                           help="dtype of the written checkpoint (default: fp16)")
            p.add_argument("--diffusers-folder", type=Path, help="also write the model as a new diffusers folder")
    return parser


def settings_from(args) -> Settings:
    return Settings(images=args.images, output=args.output, token=args.token or args.output.stem, steps=args.steps,
                    lr=args.lr, batch_size=args.batch_size, base=args.model, template=args.template, seed=args.seed,
                    noise_offset=args.noise_offset, save_every=args.save_every, log_every=args.log_every,
                    sample_prompts=tuple(args.sample_prompts), sample_steps=args.sample_steps,
                    mixed_precision=args.mixed_precision, cpu=args.cpu, progress=not args.no_progress,
                    resume=args.resume)


def run(args) -> Path:
    settings = settings_from(args)
    if args.method == "embedding":
        from .textual_inversion import train_embedding
        return train_embedding(settings, init_word=args.init_word, vectors=args.vectors)
    if args.method == "lora":
        from .lora import train_lora
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        return train_lora(settings, rank=args.rank, alpha=args.alpha, targets=targets)
    from .dreambooth import read_class_prompts, train_dreambooth
    class_prompts = read_class_prompts(args.class_prompts) if args.class_prompts else ()
    return train_dreambooth(settings, class_word=args.class_word, class_prompt=args.class_prompt,
                            class_prompts=class_prompts,
                            class_images=args.class_images, prior_weight=args.prior_weight,
                            train_text_encoder=args.train_text_encoder, save_dtype=args.save_dtype,
                            diffusers_folder=args.diffusers_folder, caption_dropout=args.caption_dropout,
                            ema_decay=args.ema_decay, prior_batch=args.prior_batch,
                            conv_lr_scale=args.conv_lr_scale, train_identifier=args.train_identifier,
                            identifier_lr=args.identifier_lr)


def main(argv: list[str] | None = None, prog: str = "latentdiff train") -> int:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser(prog).parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_command(lambda: run(args))


def run_command(work) -> int:
    """A training command's end: `work()` writes a file and returns its path, printed once (under `accelerate
    launch`, one line, not one per process); an error is one line and status 2."""
    try:
        path = work()
    except LatentDiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(f"wrote {path}")
    return 0
