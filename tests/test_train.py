"""The training stack on tiny configs: losses fall, resume is exact, EMA and caption dropout do what they say,
checkpoints are pickle-free and complete, and a 2-process CPU run under `accelerate launch` writes a model."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

from latentdiff.clip import TextEncoder, Tokenizer
from latentdiff.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, config_to_dict
from latentdiff.formats.single_file import read_single_file
from latentdiff.train.__main__ import parse_args
from latentdiff.train.autoencoder import autoencoder_stage, balanced_l1, edge_l1, init_posterior_std
from latentdiff.train.diffusion import DiffusionLoss, diffusion_stage, min_snr_weights, zero_init_residuals
from latentdiff.train.ema import EMA
from latentdiff.train.loop import StageRecipe, run_stage
from latentdiff.train.recipe import Recipe, with_overrides
from latentdiff.train.shapes import image_to_tensor, make_sample
from latentdiff.train.state import load_state, save_state
from latentdiff.train.text import init_text_encoder, text_stage
from latentdiff.unet import UNet
from latentdiff.vae import AutoencoderKL

# 32 px images and narrow layers: each stage runs a step in well under a second. The autoencoder's levels
# are 64 wide: at 32 channels GroupNorm(32) normalises each channel alone, and flat colours then cannot
# pass its output norm (see autoencoder.py), so the loss would not move in a few dozen steps.
TINY = ModelConfig(
    name="tiny",
    text=TextEncoderConfig(width=32, layers=1, heads=2, ff_width=64),
    unet=UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), num_heads=2,
                    context_dim=32),
    vae=VAEConfig(base_channels=32, channel_mult=(2, 2, 2), num_res_blocks=1),
    latent_scale=1.0,
    resolution=32,
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(pad_id=TINY.text.pad_id, max_length=TINY.text.max_length)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def logged_losses(out, stage: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / f"{stage}.jsonl").read_text().splitlines()]


def tiny_diffusion_stage(tokenizer, accelerator, recipe: StageRecipe, unet_seed: int = 0, offset_noise: float = 0.1):
    torch.manual_seed(0)  # the frozen parts are the same in every call, as trained stages would be
    vae, text = AutoencoderKL(TINY.vae), TextEncoder(TINY.text)
    torch.manual_seed(unet_seed)
    unet = UNet(TINY.unet)
    zero_init_residuals(unet)
    return diffusion_stage(unet, vae, text, tokenizer, TINY, recipe, seed=0, caption_dropout=0.1, ema_decay=0.99,
                           pool_size=64, accelerator=accelerator, offset_noise=offset_noise)


# -- each stage learns ---------------------------------------------------------------------------------

def test_autoencoder_loss_decreases(tmp_path, accelerator):
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae)
    init_posterior_std(vae, 0.01)
    recipe = StageRecipe(steps=60, batch_size=8, lr=1e-3, warmup=5, log_every=1)
    stage = autoencoder_stage(vae, recipe, seed=0, image_size=32, low_res=16, low_res_steps=50, kl_weight=1e-4,
                              edge_weight=1.0)
    # Per-batch losses swing with the pictures (0.4 to 0.8); score 16 full-size images never trained on.
    unseen = stage.make_batch(recipe.steps, 1_000_000, 16, torch.Generator())
    with torch.no_grad():
        loss_before, parts_before = stage.module(unseen)
    run_stage(stage, accelerator, tmp_path, seed=0, progress=False)
    with torch.no_grad():
        loss_after, parts_after = stage.module(unseen)
    assert len(logged_losses(tmp_path, "vae")) == 60
    # A random decoder outputs ~0: an error of mean |x|, 0.72 here. Autoencoders start slowly (flat colours
    # first, then outlines). Measured after these 60 steps: objective 1.268 -> 1.078, edge L1 0.562 ->
    # 0.434, plain L1 0.722 -> 0.699 (0.722 -> 0.668 before the edge term took its share of the gradient).
    # One that does not learn stays where it started or drifts up.
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    assert parts_after["edge"] < parts_before["edge"] - 0.05, (parts_before["edge"], parts_after["edge"])
    assert parts_after["l1"] < parts_before["l1"] - 0.01, (parts_before["l1"], parts_after["l1"])


def two_squares() -> torch.Tensor:
    """Two 32 px pictures on one background: a 4x4 square and a 16x16 square."""
    images = torch.full((2, 3, 32, 32), -1.0)
    images[0, :, 14:18, 14:18] = images[1, :, 8:24, 8:24] = 1.0
    return images


def test_balanced_l1_weighs_a_small_shape_as_much_as_a_big_one():
    images = two_squares()
    on_shape = (images > 0).float()
    only = [(torch.arange(2) == k).view(2, 1, 1, 1) for k in (0, 1)]  # masks selecting image k
    for k in (0, 1):  # an error of 0.4 on every pixel of one image's shape, none elsewhere
        recon = images - 0.4 * on_shape * only[k]
        # That image's shape half is 0.4, its background half 0, the other image 0: (0.4 / 2) / 2 images.
        assert balanced_l1(recon, images).item() == pytest.approx(0.1), k
    # The background half: 0.2 everywhere off the shape of image 0 costs it 0.1, whatever the shape's size.
    assert balanced_l1(images + 0.2 * (1 - on_shape) * only[0], images).item() == pytest.approx(0.05)


def test_edge_l1_counts_only_outlines_and_each_image_alike():
    images = two_squares()
    assert edge_l1(images, images).item() == 0
    assert edge_l1(images + 0.3, images).item() == pytest.approx(0, abs=1e-6)  # flat errors: the pixel L1's job
    # A blurred outline halves each step across it (2 -> 1 here): the edge error is about 1 per edge pixel,
    # alike for both images although the big square's outline is four times longer.
    blurred = torch.nn.functional.avg_pool2d(images, 2, stride=1, padding=1, count_include_pad=False)[..., 1:, 1:]
    per_image = [edge_l1(blurred[i:i + 1], images[i:i + 1]).item() for i in (0, 1)]
    assert per_image[0] == pytest.approx(per_image[1], rel=0.2) and per_image[0] > 0.5, per_image
    assert edge_l1(blurred, images).item() == pytest.approx(sum(per_image) / 2)


def test_text_encoder_contrastive_loss_decreases(tmp_path, tokenizer, accelerator):
    torch.manual_seed(0)
    text = TextEncoder(TINY.text)
    init_text_encoder(text)
    recipe = StageRecipe(steps=150, batch_size=16, lr=2e-3, warmup=5, log_every=1)
    stage = text_stage(text, tokenizer, recipe, seed=0, image_size=32, embed_dim=32)
    # The training loss of 16-pair batches is too noisy to compare; score 32 pairs never trained on.
    unseen = stage.make_batch(0, 1_000_000, 32, torch.Generator())
    with torch.no_grad():
        before = stage.module(unseen)[0].item()
    run_stage(stage, accelerator, tmp_path, seed=0, progress=False)
    with torch.no_grad():
        after = stage.module(unseen)[0].item()
    # Chance is ln(32) = 3.47 (random init sits above it: confident and wrong). Half the batch are twins
    # that differ from their originals in the shape or in swapped colours, the hardest negatives there are.
    # Measured after: 3.19.
    assert after < math.log(32) - 0.2 and after < before - 1.0, (before, after)
    assert len(logged_losses(tmp_path, "text")) == 150


def test_text_batches_pair_each_sample_with_its_twin(tokenizer):
    stage = text_stage(TextEncoder(TINY.text), tokenizer, StageRecipe(steps=1, batch_size=6, lr=1e-3), seed=3,
                       image_size=32, embed_dim=32)
    batch = stage.make_batch(0, 40, 6, torch.Generator())
    expected = [make_sample(3, i, 32) for i in (40, 41, 42)]
    expected += [make_sample(3, i, 32, twin=twin) for i, twin in ((40, "shape"), (41, "shape"), (42, "swap"))]
    assert torch.equal(batch["images"], torch.stack([image_to_tensor(image) for image, _, _ in expected]))
    tokens = tokenizer([caption for _, caption, _ in expected])
    assert torch.equal(batch["tokens"], tokens[:, :batch["tokens"].shape[1]])


def test_unet_loss_decreases(tmp_path, tokenizer, accelerator):
    recipe = StageRecipe(steps=30, batch_size=8, lr=2e-3, warmup=5, log_every=1)
    run_stage(tiny_diffusion_stage(tokenizer, accelerator, recipe), accelerator, tmp_path, seed=0, progress=False)
    losses = logged_losses(tmp_path, "unet")
    # Zero-initialised output predicts eps = 0: the first loss is E[eps^2] = 1 up to sampling noise.
    assert losses[0] == pytest.approx(1.0, abs=0.15)
    assert sum(losses[-5:]) / 5 < 0.8, losses


# -- resume, checkpoints ---------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def test_resumed_run_equals_uninterrupted_run(tmp_path, tokenizer, accelerator):
    recipe = StageRecipe(steps=6, batch_size=4, lr=2e-3, warmup=2, log_every=1, checkpoint_every=3)
    whole = tiny_diffusion_stage(tokenizer, accelerator, recipe)
    run_stage(whole, accelerator, tmp_path / "whole", seed=0, progress=False)

    broken = tiny_diffusion_stage(tokenizer, accelerator, recipe)
    make_batch = broken.make_batch

    def crash_at_step_4(step, first, count, generator):
        if step == 4:  # after the checkpoint at step 3
            raise Interrupt
        return make_batch(step, first, count, generator)

    broken.make_batch = crash_at_step_4
    with pytest.raises(Interrupt):
        run_stage(broken, accelerator, tmp_path / "resumed", seed=0, progress=False)
    resumed = tiny_diffusion_stage(tokenizer, accelerator, recipe, unet_seed=1)  # other weights until loaded
    run_stage(resumed, accelerator, tmp_path / "resumed", seed=0, progress=False)

    # Same CPU ops in the same order on the same data and noise: equal to the bit, no tolerance needed.
    for (name, a), b in zip(whole.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in whole.ema.shadow.items():
        assert torch.equal(a, resumed.ema.shadow[name]), name
    assert logged_losses(tmp_path / "whole", "unet") == logged_losses(tmp_path / "resumed", "unet")


def test_checkpoint_holds_optimizer_state_without_pickles(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    ema = EMA(module, 0.9)
    for step in range(3):
        module(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(module, step)
    save_state(tmp_path, step=3, module=module, optimizer=optimizer, ema=ema, extra={"seconds": 1.0})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as f:
        keys = set(f.keys())
    for index in range(4):  # two weights, two biases: Adam keeps two moments and a step count for each
        assert {f"optimizer.{index}.exp_avg", f"optimizer.{index}.exp_avg_sq", f"optimizer.{index}.step"} <= keys
    assert {"module.0.weight", "ema.0.weight"} <= keys
    sidecar = json.loads((tmp_path / "state.json").read_text())
    assert sidecar["step"] == 3 and sidecar["optimizer"]["param_groups"][0]["lr"] == 1e-2

    torch.manual_seed(1)
    restored = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1.0)
    restored_ema = EMA(restored, 0.9)
    load_state(tmp_path, module=restored, optimizer=restored_optimizer, ema=restored_ema)
    x = torch.randn(5, 4)
    for m, opt in ((module, optimizer), (restored, restored_optimizer)):  # one more step: same moments, same lr
        m(x).square().mean().backward()
        opt.step()
    for a, b in zip(module.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(ema.shadow[k], restored_ema.shadow[k]) for k in ema.shadow)


# -- EMA, caption dropout, recipe overrides ---------------------------------------------------------

def test_ema_update_formula():
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    module = nn.Module()
    module.w = param
    ema = EMA(module, decay=0.9)
    with torch.no_grad():
        param.copy_(torch.tensor([3.0, 2.0]))
    ema.update(module, step=100)  # warm-up over: (1 + 100) / (10 + 100) = 0.918 > 0.9, so d = 0.9
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.1 * 2]))
    ema.update(module, step=0)  # warm-up: d = (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.1 * 1.2 + 0.9 * 3, 0.1 * -1.6 + 0.9 * 2]))
    ema.copy_to(module)
    assert torch.equal(param.detach(), ema.shadow["w"])


def test_ema_without_warmup_keeps_the_starting_weights_from_the_first_step():
    param = nn.Parameter(torch.tensor([1.0]))
    module = nn.Module()
    module.w = param
    ema = EMA(module, decay=0.9, warmup=False)
    with torch.no_grad():
        param.copy_(torch.tensor([3.0]))
    ema.update(module, step=0)  # d = 0.9 at once, not the warm-up's 0.1
    assert torch.allclose(ema.shadow["w"], torch.tensor([0.9 * 1 + 0.1 * 3]))


def test_caption_dropout_rate(tokenizer, accelerator):
    recipe = StageRecipe(steps=1, batch_size=32, lr=1e-3)
    stage = tiny_diffusion_stage(tokenizer, accelerator, recipe)
    torch.manual_seed(0)  # rebuild the stage's frozen encoder: same seed, same draws as tiny_diffusion_stage
    AutoencoderKL(TINY.vae)
    text = TextEncoder(TINY.text)
    with torch.no_grad():
        empty = text(tokenizer([""])).half().float()  # the pool keeps caption features in fp16
    contexts = torch.cat([stage.make_batch(step, 32 * step, 32, torch.Generator().manual_seed(step))["context"]
                          for step in range(200)])
    dropped = (contexts == empty).all(dim=2).all(dim=1)
    # 6400 draws: binomial standard deviation sqrt(0.1 * 0.9 / 6400) = 0.0037, so +-0.015 is 4 of them.
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    assert not (contexts[~dropped] == empty).all(dim=2).all(dim=1).any()  # the rest keep their captions


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_offset_noise_adds_a_constant_per_image_and_channel(tokenizer, accelerator, offset):
    stage = tiny_diffusion_stage(tokenizer, accelerator, StageRecipe(steps=1, batch_size=32, lr=1e-3),
                                 offset_noise=offset)
    noise = torch.cat([stage.make_batch(step, 32 * step, 32, torch.Generator().manual_seed(step))["noise"]
                       for step in range(100)])
    h, w = noise.shape[2:]
    # The spatial mean of i.i.d. N(0, 1) noise has variance 1 / (h w); the offset adds offset^2 to it.
    # 12800 (image, channel) means: the variance estimate's relative std is sqrt(2 / 12800) = 1.3%.
    expected = offset**2 + 1 / (h * w)
    assert noise.mean(dim=(2, 3)).var().item() == pytest.approx(expected, rel=0.06)
    assert noise.var().item() == pytest.approx(1 + offset**2, rel=0.03)


def test_min_snr_weighting_scales_only_low_noise_timesteps(tokenizer, accelerator):
    abar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)  # SNR 999, 1, 0.0101
    assert torch.allclose(min_snr_weights(abar, 5.0), torch.tensor([5 / 999, 1.0, 1.0], dtype=torch.float64))
    assert torch.equal(min_snr_weights(abar, 0.0), torch.ones(3, dtype=torch.float64))

    stage = tiny_diffusion_stage(tokenizer, accelerator, StageRecipe(steps=1, batch_size=8, lr=1e-3))
    unet, abar_all = stage.module.unet, stage.module.alphas_cumprod
    for p in unet.out.parameters():  # a non-zero prediction, so the loss depends on the network
        nn.init.normal_(p, std=0.1)
    batch = stage.make_batch(0, 0, 8, torch.Generator().manual_seed(0))
    weighted, plain = DiffusionLoss(unet, abar_all, snr_gamma=5.0), DiffusionLoss(unet, abar_all)
    with torch.no_grad():
        for t, factor in ((0, 5 / (abar_all[0] / (1 - abar_all[0])).item()), (999, 1.0)):
            at_t = batch | {"timesteps": torch.full((8,), t)}
            assert weighted(at_t)[0].item() == pytest.approx(factor * plain(at_t)[0].item(), rel=1e-5)


def test_recipe_overrides_and_their_errors():
    recipe = with_overrides(Recipe(), ["unet.steps=7", "seed=3", "sample_prompts=a|b"])
    assert (recipe.unet.steps, recipe.seed, recipe.sample_prompts) == (7, 3, ("a", "b"))
    assert recipe.vae == Recipe().vae
    with pytest.raises(ValueError, match="unknown field 'unet.stpes'"):
        with_overrides(Recipe(), ["unet.stpes=7"])
    with pytest.raises(ValueError, match="not a int"):
        with_overrides(Recipe(), ["unet.steps=many"])


def test_repeated_set_options_add_up():
    args = parse_args(["--out", "x", "--set", "unet.steps=7", "--set", "seed=3", "text.steps=5"])
    assert args.overrides == ["unet.steps=7", "seed=3", "text.steps=5"]


# -- the command, with two processes -------------------------------------------------------------------

def test_two_process_cpu_run_writes_a_model(tmp_path):
    config = config_to_dict(TINY) | {"resolution": 64}  # the pipeline draws the sample grid at >= 64 px
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    steps = [f"{stage}.{field}={value}" for stage in ("vae", "text", "unet")
             for field, value in (("steps", 2), ("batch_size", 4), ("warmup", 1), ("log_every", 1))]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "latentdiff.train", "--out", str(out), "--config", str(tmp_path / "tiny.json"), "--no-progress",
               "--set", *steps, "sample_steps=2", "latent_std_images=8", "latent_pool=8",
               "sample_prompts=a red circle"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "training.json").read_text())
    assert summary["processes"] == 2
    assert {name: s["steps"] for name, s in summary["stages"].items()} == {"vae": 2, "text": 2, "unet": 2}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}  # shipped in fp16
    model = read_single_file(out / "model.safetensors")
    assert model.config.unet == TINY.unet
    assert model.config.latent_scale == summary["latent_scale"] != 1.0  # measured, not the preset's value
    assert (out / "samples.png").is_file()
    for stage in ("vae", "text", "unet"):
        assert len(logged_losses(out, stage)) == 2
        assert sorted(p.name for p in (out / "checkpoints" / stage).iterdir()) == ["state.json", "state.safetensors"]
