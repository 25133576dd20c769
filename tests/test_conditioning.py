"""The conditioning record through guidance: Cond parts batched for CFG field by field, concat channels
joined unscaled to the scaled latents, the other parts reaching the network; 9-channel U-Nets end to end
through the denoiser, and stopped by the pipeline until it builds their conditioning."""

import dataclasses

import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff.conditioning import Cond, Control, cat_conds, concat_family, map_tensors
from latentdiff.config import UNetConfig, preset
from latentdiff.denoisers import CFGDenoiser, DiscreteDenoiser
from latentdiff.errors import InputError, UnsupportedModelError
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline
from latentdiff.schedules import alphas_cumprod_for, training_sigmas
from latentdiff.unet import UNet

ACP = alphas_cumprod_for(preset("sd1"))


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def full_cond(batch: int, value: float) -> Cond:
    """A record with every part set, each filled with `value` (so a batched call shows whose rows are whose)."""
    return Cond(context=torch.full((batch, 3, 8), value), concat=torch.full((batch, 5, 4, 4), value),
                y=torch.full((batch, 6), value),
                control=Control(skips=(torch.full((batch, 2, 4, 4), value), torch.full((batch, 2, 2, 2), value)),
                                middle=torch.full((batch, 2, 2, 2), value)))


class Recorder:
    """A network that records what it is called with and whose output depends on every part."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, **parts):
        self.calls.append(dict(x=x, t=t, context=context, **parts))
        per_row = x[:, 4:].mean(dim=(1, 2, 3)) + context.mean(dim=(1, 2))
        out = x[:, :4] * 0.3 + per_row.view(-1, 1, 1, 1)
        if "y" in parts:
            out = out + parts["y"].mean(dim=1).view(-1, 1, 1, 1)
        if "control" in parts:
            out = out + parts["control"].middle.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return out


def test_cfg_batches_every_part_uncond_first():
    network = Recorder()
    base = DiscreteDenoiser(network, ACP)
    x, sigma = randn(2, 4, 4, 4), training_sigmas(ACP)[500]
    cond, uncond = full_cond(2, 1.0), full_cond(2, -1.0)
    guided = CFGDenoiser(base)(x, sigma, cond=cond, uncond=uncond, cfg_scale=5.0)
    assert len(network.calls) == 1  # one batched call
    call = network.calls[0]
    for part in (call["context"], call["x"][:, 4:], call["y"], call["control"].middle, *call["control"].skips):
        assert part.shape[0] == 4 and bool((part[:2] == -1).all()) and bool((part[2:] == 1).all())
    # the latents are scaled by c_in = 1 / sqrt(sigma^2 + 1); the concat channels are not
    assert torch.allclose(call["x"][:, :4], torch.cat([x, x]) / (sigma**2 + 1) ** 0.5)
    expected = base(x, sigma, uncond) + 5.0 * (base(x, sigma, cond) - base(x, sigma, uncond))
    assert torch.allclose(guided, expected, atol=1e-6)
    assert (base(x, sigma, cond) - base(x, sigma, uncond)).abs().min() > 1  # every part moved the output


def test_missing_parts_stay_none_and_are_not_passed():
    network = Recorder()
    x, sigma = randn(1, 4, 4, 4), torch.tensor(3.0)
    CFGDenoiser(DiscreteDenoiser(network, ACP))(x, sigma, cond=Cond(context=torch.ones(1, 3, 8)),
                                                uncond=torch.zeros(1, 3, 8), cfg_scale=2.0)  # a bare tensor: context
    assert set(network.calls[0]) == {"x", "t", "context"} and network.calls[0]["x"].shape == (2, 4, 4, 4)
    both = cat_conds([Cond(context=torch.ones(1, 3, 8)), Cond(context=torch.zeros(1, 3, 8))])
    assert both.concat is None and both.y is None and both.control is None and both.context.shape == (2, 3, 8)


def test_mismatched_records_are_refused_by_name():
    cond = full_cond(2, 1.0)
    with pytest.raises(InputError, match="concat is set in some conditioning records and not in others"):
        cat_conds([dataclasses.replace(cond, concat=None), cond])
    with pytest.raises(InputError, match=r"uncond shape \(1, 6\) differs from cond shape \(2, 6\) in y"):
        cat_conds([dataclasses.replace(cond, y=torch.zeros(1, 6)), cond])
    with pytest.raises(InputError, match="uncond shape .* in context; encode the negative prompt"):
        cat_conds([dataclasses.replace(cond, context=torch.zeros(2, 4, 8)), cond])
    short = dataclasses.replace(cond, control=Control(skips=cond.control.skips[:1], middle=cond.control.middle))
    with pytest.raises(InputError, match=r"control.skips holds \[1, 2\] tensors"):
        cat_conds([short, cond])


def test_map_tensors_reaches_every_part():
    cast = map_tensors(full_cond(1, 2.0), lambda t: t.to(torch.float64))
    assert isinstance(cast, Cond) and isinstance(cast.control, Control)
    assert all(t.dtype == torch.float64 for t in (cast.context, cast.concat, cast.y, cast.control.middle,
                                                   *cast.control.skips))


def test_nine_channel_unet_through_the_denoiser():
    """A 9-channel (inpainting-style) U-Net: D(x, sigma, Cond(context, concat)) feeds it [c_in x, concat]
    and reads eps for the 4 latent channels."""
    cfg = UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                     num_heads=2, context_dim=16)
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x, concat, context = randn(2, 4, 8, 8), randn(2, 5, 8, 8, seed=1), randn(2, 7, 16, seed=2)
    sigma = training_sigmas(ACP)[700]
    denoiser = DiscreteDenoiser(unet, ACP)
    with torch.no_grad():
        got = denoiser(x, sigma, Cond(context=context, concat=concat))
        t = denoiser.sigma_to_t(sigma.expand(2))
        eps = unet(torch.cat([x / (sigma**2 + 1) ** 0.5, concat], dim=1), t, context)
        other = denoiser(x, sigma, Cond(context=context, concat=concat * 0))
    assert got.shape == x.shape
    assert torch.equal(got, x - sigma * eps)
    assert (got - other).abs().max() > 1e-3  # the concat channels reach the output


def test_pipeline_stops_a_model_whose_conditioning_it_cannot_build(tmp_path, capsys):
    """A 7-channel (upscaler) checkpoint loads (its U-Net is detected and built), and generating with it stops
    with the family named, before any sampling. (Inpainting U-Nets generate: test_inpaint*.py.)"""
    upscaler = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, in_channels=7))
    path = save_model(tiny_model(upscaler), tmp_path / "upscaler.safetensors")
    pipe = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert pipe.config.unet.in_channels == 7
    with pytest.raises(UnsupportedModelError, match="an upscaler U-Net .* takes 7 input channels"):
        pipe.txt2img("a red circle", steps=1, progress=False)
    from latentdiff.cli import main
    assert main(["info", str(path)]) == 0
    assert "variant:     an upscaler U-Net" in capsys.readouterr().out
    assert "InstructPix2Pix" in concat_family(8, 4)
    assert concat_family(6, 4) == "a U-Net with 2 extra input channels"
