"""Full-size parity report: latentdiff's networks against diffusers / transformers at real SD size.

The unit tests prove parity on tiny configs; this tool repeats the comparison at full size (SD 1.5: an
860M-parameter U-Net, the 123M CLIP ViT-L text encoder, the 84M VAE), where a mapping or layout error in
a block that the tiny configs do not have would show. Weights are seeded random tensors (no hub access
is needed), scaled by fan-in so activations stay O(1) and the absolute diffs mean something. Each
network is materialised once: the reference model is loaded with the very same tensors through our key
mapping, so a pair costs the memory of one copy. Pairs run one after another and are freed in between.

    python tools/parity_full.py                      # SD 1.5, 512x512 images / 64x64 latents, CPU fp32
    python tools/parity_full.py --preset sd2-v          # add --size 768 for its native size (slower)

Prints parameter counts, max abs / relative diffs per output, wall times and peak memory; exits with
status 1 when an output differs by more than the fp32 tolerance.
"""

import argparse
import gc
import math
import resource
import time

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.checkpoint import load_strict
from latentdiff.config import preset
from latentdiff.formats.clip_keys import text_config_to_hf
from latentdiff.formats.unet_keys import unet_config_to_diffusers, unet_to_diffusers
from latentdiff.formats.vae_keys import vae_config_to_diffusers, vae_to_diffusers
from latentdiff.model import build_on_meta

# fp32 and identical weights: only the order of floating-point sums may differ. The bound is relative to
# the largest reference value so that it holds whatever scale an output has (these are O(1..5)).
REL_TOL = 1e-5
PROMPTS = [
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k",
    # longer than 77 tokens: exercises truncation (the end token is kept) and every position embedding
    "an oil painting of a lighthouse on a cliff at dusk, " * 8,
    "",  # the unconditional prompt of classifier-free guidance
]
TIMESTEPS = (999.0, 261.5)  # the first step of a schedule, and a fractional one as k-diffusion produces


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every entry of `module`'s (meta) state dict: weights ~ N(0, 1/fan_in),
    norm gains ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2). Nothing is left at zero (as the zero-initialised
    output convs would be), so every tensor's mapping affects the outputs."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, meta in module.state_dict().items():
        noise = torch.randn(meta.shape, generator=gen)
        if meta.ndim >= 2:
            out[name] = noise / math.sqrt(math.prod(meta.shape[1:]))
        elif name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        else:
            out[name] = 0.1 * noise
    return out


def materialise(ours: torch.nn.Module, seed: int, device: torch.device, what: str) -> None:
    load_strict(ours, random_state_dict(ours, seed), where=f"random {what}")
    ours.to(device)


def reference(build, state_dict: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A reference model built with empty parameters, then given `state_dict`'s tensors (shared, not copied).
    init_empty_weights keeps buffers real: CLIPTextModel's position_ids is not in any state dict."""
    with init_empty_weights(include_buffers=False):
        model = build()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval()  # moves the buffers; the parameters are already there


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn):
    start = time.perf_counter()
    with torch.no_grad():
        result = fn()
    return result, time.perf_counter() - start


class Report:
    def __init__(self):
        self.params, self.rows, self.failed = [], [], False

    def network(self, name: str, ours: torch.nn.Module, theirs: torch.nn.Module, what: str):
        self.params.append((name, count(ours), count(theirs), what))

    def compare(self, output: str, ours: torch.Tensor, theirs: torch.Tensor,
                t_ours: float | None = None, t_theirs: float | None = None):
        """One output pair; the times are those of the calls that produced it (None: counted in another row)."""
        if ours.shape != theirs.shape:
            raise AssertionError(f"{output}: shape {tuple(ours.shape)} (ours) != {tuple(theirs.shape)} (reference)")
        diff = (ours - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        rel = diff / scale if scale else math.inf
        self.failed |= not rel <= REL_TOL
        self.rows.append((output, "x".join(map(str, theirs.shape)), scale, diff, rel, t_ours, t_theirs))
        print(f"  {output}: max abs diff {diff:.3e} (rel {rel:.2e})", flush=True)

    def print(self):
        print("\nparameters")
        print(f"  {'network':<14}{'latentdiff':>14}{'reference':>14}  reference model")
        for name, ours, theirs, what in self.params:
            print(f"  {name:<14}{ours:>14,}{theirs:>14,}  {what}")
        print("\noutputs (fp32)")
        print(f"  {'output':<34}{'shape':>14}{'max|ref|':>10}{'max abs diff':>14}{'rel diff':>10}"
              f"{'ours s':>8}{'ref s':>8}")
        for output, shape, scale, diff, rel, t_ours, t_theirs in self.rows:
            print(f"  {output:<34}{shape:>14}{scale:>10.3f}{diff:>14.3e}{rel:>10.2e}"
                  f"{seconds(t_ours)}{seconds(t_theirs)}")


def seconds(t: float | None) -> str:
    return f"{'-' if t is None else f'{t:.1f}':>8}"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def free(*modules: torch.nn.Module) -> None:
    """Release a network pair: the reference holds the same tensors, so both must go; ours returns to meta."""
    for module in modules:
        module.to("meta")
    gc.collect()


def text_pair(model, report: Report, device, seed: int) -> torch.Tensor:
    """CLIP on real prompts. transformers' CLIPTextModel always returns its last layer, so it is built, as
    diffusers' folders hold it, with the layers after the conditioning layer dropped (SD 2.x: 24 -> 23).
    Returns our conditioning features, the U-Net's context."""
    cfg = model.config.text
    ours = model.text_encoder
    materialise(ours, seed, device, "text encoder")
    keep = cfg.layers + 1 + cfg.output_layer
    dropped = tuple(f"transformer.text_model.encoder.layers.{i}." for i in range(keep, cfg.layers))
    # transformers 5 names CLIPTextModel's tensors without the `text_model.` level that files carry
    hf_sd = {k.removeprefix("transformer.text_model."): v for k, v in ours.state_dict().items()
             if not k.startswith(dropped)}
    theirs = reference(lambda: CLIPTextModel(CLIPTextConfig(**text_config_to_hf(cfg))), hf_sd, device)
    report.network("text encoder", ours, theirs, f"CLIPTextModel, {keep} of {cfg.layers} layers")

    tokens = model.tokenizer(PROMPTS).to(device)
    ref, t_theirs = timed(lambda: theirs(tokens, output_hidden_states=True))
    # hidden_states[k] is block k's output before the final layer norm, which SD applies to every layer it uses
    ref_penultimate = theirs.final_layer_norm(ref.hidden_states[-2]).detach()
    layer = cfg.output_layer
    cond, t_ours = timed(lambda: ours(tokens))
    report.compare(f"text layer {layer} (cond.)", cond, ref.last_hidden_state, t_ours, t_theirs)
    earlier, t_ours = timed(lambda: ours(tokens, layer=layer - 1))
    report.compare(f"text layer {layer - 1} (clip skip)", earlier, ref_penultimate, t_ours)
    free(ours, theirs)
    return cond[[0, -1]]  # astronaut prompt and empty prompt: a CFG batch


def unet_pair(model, report: Report, device, seed: int, latent: int, context: torch.Tensor) -> None:
    cfg = model.config.unet
    ours = model.unet
    materialise(ours, seed, device, "U-Net")
    theirs = reference(lambda: UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)),
                       unet_to_diffusers(ours.state_dict(), cfg), device)
    report.network("unet", ours, theirs, "diffusers UNet2DConditionModel")

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, latent, latent, generator=gen).expand(2, -1, -1, -1).to(device)
    for t in TIMESTEPS:
        ts = torch.full((2,), t, device=device)
        ref, t_theirs = timed(lambda: theirs(x, ts, encoder_hidden_states=context).sample)
        got, t_ours = timed(lambda: ours(x, ts, context))
        report.compare(f"unet t={t:g} cond+uncond", got, ref, t_ours, t_theirs)
    free(ours, theirs)


def vae_pair(model, report: Report, device, seed: int, size: int) -> None:
    cfg = model.config.vae
    ours = model.vae
    materialise(ours, seed, device, "VAE")
    theirs = reference(lambda: AutoencoderKL(**vae_config_to_diffusers(cfg, model.config.latent_scale)),
                       vae_to_diffusers(ours.state_dict(), cfg), device)
    report.network("vae", ours, theirs, "diffusers AutoencoderKL")

    image = sample_image(size).to(device)
    posterior, t_theirs = timed(lambda: theirs.encode(image).latent_dist)
    got, t_ours = timed(lambda: ours.encode(image))
    report.compare(f"vae encode {size}px: mean", got.mean, posterior.mean, t_ours, t_theirs)
    report.compare(f"vae encode {size}px: std", got.std, posterior.std)
    latents = torch.randn(1, cfg.latent_channels, size // 8, size // 8,
                          generator=torch.Generator().manual_seed(seed)).to(device)
    ref, t_theirs = timed(lambda: theirs.decode(latents).sample)
    got, t_ours = timed(lambda: ours.decode(latents))
    report.compare(f"vae decode {size // 8}x{size // 8} latents", got, ref, t_ours, t_theirs)
    free(ours, theirs)


def sample_image(size: int) -> torch.Tensor:
    """A smooth, deterministic RGB image in [-1, 1] with edges: a colour gradient and a disc."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.25).float()
    rgb = torch.stack([x, torch.sin(3 * y), 2 * disc - 1])
    return rgb.clamp(-1, 1).unsqueeze(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["sd1", "sd2-v"], default="sd1")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents: size/8); default 512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 64:
        parser.error(f"--size {args.size}: must be a positive multiple of 64 (the U-Net halves 64x64 "
                     "latents three times), e.g. 512 or 768")
    device = torch.device(args.device)
    # fp32 means fp32: TF32 tensor-core matmuls and convolutions would round to 10-bit mantissas on GPUs
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    start = time.perf_counter()
    config = preset(args.preset)
    model = build_on_meta(config)  # every network empty until its turn
    print(f"preset {args.preset}: {args.size}x{args.size} images, {args.size // 8}x{args.size // 8} latents, "
          f"fp32 on {device} ({torch.get_num_threads()} threads), seed {args.seed}, torch {torch.__version__}",
          flush=True)
    report = Report()
    context = text_pair(model, report, device, args.seed)
    unet_pair(model, report, device, args.seed + 1, args.size // 8, context)
    vae_pair(model, report, device, args.seed + 2, args.size)
    report.print()
    print(f"\nwall time {time.perf_counter() - start:.0f} s (random weights included), "
          f"peak RSS {peak_rss_gb():.1f} GB"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB"
             if device.type == "cuda" else ""))
    print(f"tolerance: max abs diff <= {REL_TOL:g} x max|reference| per output: "
          + ("FAILED" if report.failed else "all within"))
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
