"""The hires fix on tiny random models: A1111's size rules, the steps the second pass runs, the noise it draws,
its infotext and replay, and bad input through the command line. Parity with diffusers: test_hires_parity.py."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import SD1, tiny_model

from latentdiff.cli import main
from latentdiff.errors import FieldError
from latentdiff.hires import SecondPass, target_sizes
from latentdiff.infotext import from_fields, parse_parameters, read_png_parameters, to_fields
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline
from latentdiff.request import GenerationRequest
from latentdiff.schedules import alphas_cumprod_for, make_sigmas

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = dict(steps=3, sampler="Euler", progress=False)


@pytest.fixture(scope="module")
def pipe(single_thread):
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(tiny_model(SD1), tmp_path_factory.mktemp("model") / "tiny.safetensors")


def hires(width, height, **fields) -> GenerationRequest:
    return GenerationRequest(width=width, height=height, enable_hr=True, **fields)


# -- sizes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, fields, upscaled, final", [
    ((64, 64), dict(), (128, 128), (128, 128)),  # hr_scale's default, 2
    ((512, 768), dict(hr_scale=1.5), (768, 1152), (768, 1152)),
    ((512, 512), dict(hr_scale=1.7), (870, 870), None),  # int(512 * 1.7): refused below, not a multiple of 64
    ((512, 768), dict(hr_resize_x=1024), (1024, 1536), (1024, 1536)),  # the other side keeps the aspect ratio
    ((768, 512), dict(hr_resize_y=1024), (1536, 1024), (1536, 1024)),
    ((512, 768), dict(hr_resize_x=1024, hr_resize_y=1024), (1024, 1536), (1024, 1024)),  # cover, then crop
    ((768, 512), dict(hr_resize_x=1024, hr_resize_y=1024), (1536, 1024), (1024, 1024)),
    ((512, 512), dict(hr_resize_x=1024, hr_resize_y=640, hr_scale=3.0), (1024, 1024), (1024, 640)),  # scale unused
])
def test_target_sizes_follow_a1111(size, fields, upscaled, final):
    request = hires(*size, **fields)
    if final is None:
        with pytest.raises(FieldError, match=r"hr_scale gives a hires width of 870 px \(1.7 times 512x512\)"):
            target_sizes(request, 64)
        return
    assert target_sizes(request, 64) == (upscaled, final)


@pytest.mark.parametrize("fields, field, message", [
    (dict(hr_scale=1.5), "hr_scale", "hires width of 96 px (1.5 times 64x64): each hires side must be a multiple "
                                     "of 64 between 64 and 4096"),
    (dict(hr_resize_x=4160), "hr_resize_x", "hires width of 4160 px"),
    (dict(hr_resize_y=100), "hr_resize_y", "hires width of 100 px (height 100 with the aspect ratio of 64x64)"),
    (dict(hr_resize_x=4096, hr_resize_y=1024, height=128), "hr_resize_x",
     "needs an upscale to 4096x8192 before the crop to 4096x1024: over 4096 px"),
])
def test_bad_target_sizes_name_their_field(fields, field, message):
    fields = dict(width=64, height=64) | fields
    with pytest.raises(FieldError, match=re.escape(message)) as caught:
        target_sizes(hires(fields.pop("width"), fields.pop("height"), **fields), 64)
    assert caught.value.field == field


@pytest.mark.parametrize("fields, field, message", [
    (dict(hr_second_pass_steps=5), "hr_second_pass_steps", "applies only to the hires fix, which is off"),
    (dict(hr_upscaler="Lanczos"), "hr_upscaler", "applies only to the hires fix"),
    (dict(enable_hr=True, hr_upscaler="R-ESRGAN 4x+"), "hr_upscaler", "is not an upscaler latentdiff has"),
    (dict(enable_hr=True, hr_scale=0.5), "hr_scale", "must be a number from 1 to 8"),
    (dict(enable_hr=True, hr_resize_x=-64), "hr_resize_x", "must be a whole number >= 0"),
    (dict(enable_hr=True, hr_sampler_name="nonsense"), "hr_sampler_name", "nonsense"),
    (dict(enable_hr=True, hr_sampler_name="Euler", eta=0.5, sampler="Euler a"), "hr_sampler_name", "takes no eta"),
    (dict(enable_hr=True, hr_prompt=["a", "b"]), "hr_prompt", "has 2 entries for 1 prompts"),
    (dict(enable_hr=True, hr_scheduler="Karras!"), "hr_scheduler", "unknown schedule 'Karras!'"),
    (dict(enable_hr=True, init_image=Image.new("RGB", (64, 64))), "enable_hr", "is a txt2img option"),
    (dict(enable_hr="yes"), "enable_hr", "must be True or False"),
])
def test_bad_hires_fields_are_named(fields, field, message):
    with pytest.raises(FieldError, match=re.escape(message)) as caught:
        GenerationRequest(prompt="a cat", **fields).validate()
    assert caught.value.field == field


def test_a_crop_keeps_the_centre_as_a1111_slices_it(pipe):
    """128x64 first pass, resize to 128x128: upscaled to 256x128 px, then A1111's latent slice
    [t // 2 : W - (t + 1) // 2] with t = (256 - 128) // 8 columns cut."""
    request, _ = pipe.prepare(hires(128, 64, prompt="a cat", hr_resize_x=128, hr_resize_y=128))
    second = SecondPass(pipe, request, pipe._conditioning(request))
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    upscaled = F.interpolate(latents, size=(128 // 8, 256 // 8), mode="bilinear")
    t = (256 - 128) // 8
    assert torch.equal(second.upscale(latents, []), upscaled[:, :, :, t // 2:upscaled.shape[3] - (t + 1) // 2])


# -- the second pass ------------------------------------------------------------------------------------------

def test_prompt_edits_in_the_second_pass_count_its_own_steps(pipe):
    """A1111's hires schedule: a fraction counts from 1.0, the end of the first pass, so `[a cat:a dog:0.5]`
    is "a dog" for the whole second pass while the first pass switches half way."""
    request, _ = pipe.prepare(hires(64, 64, prompt="[a cat:a dog:0.5]", steps=4, cfg_scale=1.0))
    first = pipe._conditioning(request)
    second = SecondPass(pipe, request, first)
    assert not isinstance(second.conds[0], type(first[0]))  # the first pass is scheduled, the second plain
    assert torch.equal(second.conds[0].context, pipe.encode_prompt(["a dog"]))

def unet_calls(pipe, run) -> int:
    calls = []
    handle = pipe.model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("steps, hr_steps, strength, second", [
    (4, 0, 0.5, 4),  # 0: as steps, whatever the strength (A1111 hands the count to its img2img)
    (4, 3, 0.7, 3),  # not int(int(3 / 0.7) * 0.7) = 2, as a diffusers img2img would run
    (3, 5, 1.0, 5),
])
def test_the_second_pass_runs_exactly_the_steps_a1111_runs(pipe, steps, hr_steps, strength, second):
    """Euler calls the U-Net once per step (cond and uncond in one batch): first pass + second pass calls."""
    sigmas = []
    count = unet_calls(pipe, lambda: pipe.txt2img(
        "a cat", seed=1, steps=steps, sampler="Euler", enable_hr=True, hr_second_pass_steps=hr_steps,
        strength=strength, progress=False, callback=lambda info: sigmas.append(float(info["sigma"]))))
    assert count == steps + second
    # the second pass's sigmas: the last `second` steps of a schedule of int(second / min(strength, 0.999))
    schedule = make_sigmas("normal", int(second / min(strength, 0.999)), alphas_cumprod_for(pipe.config))
    assert sigmas[steps:] == pytest.approx(schedule[-1 - second:-1].tolist(), rel=1e-6)


def test_the_second_pass_adds_each_seeds_first_draw_to_the_upscaled_latents(pipe):
    """A1111 seeds fresh per-image generators for the hires pass; their first draw is the added noise."""
    seeds, shape = [20, 21], (4, 16, 16)
    first = pipe.txt2img("a cat", seed=20, batch_size=2, return_latents=True, **FAST).latents
    starts = []
    pipe.txt2img("a cat", seed=20, batch_size=2, enable_hr=True, strength=0.6,
                 callback=lambda info: starts.append(info), **FAST)
    second = starts[FAST["steps"]]  # the second pass's first step
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    expected = F.interpolate(first, size=shape[1:], mode="bilinear") + noise * second["sigma"]
    assert torch.allclose(second["x"], expected, atol=1e-5)


def test_an_image_upscaler_reencodes_the_resized_image(pipe):
    """Lanczos: the first pass decoded, resized with Lanczos, encoded to its posterior mean."""
    first = pipe.txt2img("a cat", seed=5, **FAST)
    starts = []
    pipe.txt2img("a cat", seed=5, enable_hr=True, hr_upscaler="lanczos", callback=starts.append, **FAST)
    second = starts[FAST["steps"]]
    encoded = pipe.encode_image(first.images[0].resize((128, 128), Image.LANCZOS), None)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(second["x"], encoded + noise * second["sigma"], atol=1e-5)


def test_hires_prompts_and_sampler_change_the_second_pass_only(pipe):
    base = dict(seed=3, enable_hr=True, return_latents=True, **FAST)
    plain = pipe.txt2img("a cat", **base)
    same = pipe.txt2img("a cat", hr_prompt="a cat", hr_sampler_name="euler", **base)
    other = pipe.txt2img("a cat", hr_prompt="a dog", **base)
    assert torch.equal(plain.latents, same.latents) and not torch.equal(plain.latents, other.latents)
    assert plain.images[0].size == (128, 128)


# -- infotext and replay --------------------------------------------------------------------------------------

def test_infotext_writes_the_hires_keys_as_a1111(pipe):
    result = pipe.txt2img(["a cat", "a cow"], "ugly", seed=8, enable_hr=True, hr_resize_x=128, hr_second_pass_steps=2,
                          hr_sampler_name="DPM++ 2M", hr_prompt=["a cat", "a bull, big"], strength=0.6, **FAST)
    text = pipe.infotext(result.request, 1)
    assert ("Denoising strength: 0.6, Hires sampler: DPM++ 2M, Hires prompt: \"a bull, big\", Hires resize: 128x0, "
            "Hires steps: 2, Hires upscaler: Latent, Version:") in text
    first = parse_parameters(pipe.infotext(result.request, 0)).params
    assert "Hires prompt" not in first and "Hires negative prompt" not in first and "Hires upscale" not in first


def test_an_a1111_hires_infotext_reads_as_fields():
    text = ("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Denoising strength: 0.7, "
            "Hires prompt: a wolf, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (bicubic antialiased)")
    fields, unhonoured = to_fields(parse_parameters(text))
    assert unhonoured == []
    assert {k: fields[k] for k in ("enable_hr", "strength", "hr_prompt", "hr_scale", "hr_second_pass_steps",
                                   "hr_upscaler")} == dict(enable_hr=True, strength=0.7, hr_prompt="a wolf",
                                                           hr_scale=1.5, hr_second_pass_steps=10,
                                                           hr_upscaler="Latent (bicubic antialiased)")
    # an upscaler we lack is named, and the replay takes the default
    fields, unhonoured = to_fields(parse_parameters(text.replace("Latent (bicubic antialiased)", "R-ESRGAN 4x+")))
    assert "hr_upscaler" not in fields and fields["enable_hr"] and unhonoured == ["Hires upscaler"]
    fields, _ = to_fields(parse_parameters(text.replace("Hires upscale: 1.5", "Hires resize: 0x768")))
    assert (fields["hr_resize_x"], fields["hr_resize_y"]) == (0, 768) and "hr_scale" not in fields


def test_hires_fields_survive_writing_and_reading():
    fields = dict(prompt="a", steps=4, sampler="Euler", seed=1, width=64, height=64, strength=0.5, hr_resize_x=128,
                  hr_resize_y=192, hr_upscaler="Nearest", hr_second_pass_steps=2, hr_sampler_name="DDIM",
                  hr_scheduler="karras",
                  hr_negative_prompt="ugly, dull")
    back, unhonoured = to_fields(parse_parameters(from_fields(fields)))
    assert unhonoured == [] and back.pop("enable_hr") is True
    assert {k: v for k, v in back.items() if k in fields} == fields


def cli(argv, capsys):
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out.splitlines(), out.err.splitlines()


def test_the_command_line_writes_and_replays_a_hires_png(tmp_path, model_file, capsys):
    common = ["--model", model_file, "--dtype", "fp32", "--quiet"]
    status, out, err = cli(["txt2img", "a red circle", "--steps", "2", "--seed", "4", "--sampler", "Euler a",
                            "--hr-scale", "2", "--hr-steps", "3", "--denoising-strength", "0.6", "--hr-upscaler",
                            "Latent (nearest-exact)", *common, "-o", tmp_path / "a"], capsys)
    assert status == 0 and err == []
    made = tmp_path / "a" / "4.png"
    params = parse_parameters(read_png_parameters(made)).params
    assert {k: params[k] for k in ("Size", "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler")} \
        == {"Size": "64x64", "Denoising strength": "0.6", "Hires upscale": "2", "Hires steps": "3",
            "Hires upscaler": "Latent (nearest-exact)"}
    status, out, err = cli(["txt2img", "--from-png", made, *common, "-o", tmp_path / "b"], capsys)
    assert status == 0 and err == [] and not [line for line in out if line.startswith("note:")]
    replayed = tmp_path / "b" / "4.png"
    with Image.open(made) as a, Image.open(replayed) as b:
        assert a.size == (128, 128) and np.array_equal(np.asarray(a), np.asarray(b))
    assert read_png_parameters(replayed) == read_png_parameters(made)
    status, _, err = cli(["img2img", "--from-png", made, "--init-image", made, *common, "-o", tmp_path / "c"], capsys)
    assert status == 2 and "made by txt2img with the hires fix" in err[0]


@pytest.mark.parametrize("flags, message", [
    # the tiny model's sides are multiples of 16 (an 8x VAE, one U-Net downsampling)
    (["--hr-scale", "1.1"], "--hr-scale gives a hires width of 70 px (1.1 times 64x64): each hires side must be a "
                            "multiple of 16"),
    (["--hr-resize-x", "8192"], "--hr-resize-x gives a hires width of 8192 px"),
    (["--hr-scale", "2", "--hr-upscaler", "ESRGAN_4x"], "--hr-upscaler 'ESRGAN_4x' is not an upscaler latentdiff has"),
    (["--hr-steps", "4"], "--hr-steps applies only to the hires fix, which is off"),
    (["--denoising-strength", "0.5"], "--denoising-strength is the hires fix's second-pass strength"),
    (["--hr-scale", "2", "--denoising-strength", "1.5"], "--denoising-strength must be in (0, 1]"),
    (["--hr-scale", "2", "--hr-sampler", "nope"], "--hr-sampler "),
])
def test_bad_hires_flags_are_one_line_exit_2_and_write_nothing(tmp_path, model_file, capsys, flags, message):
    status, out, err = cli(["txt2img", "a cat", "--steps", "2", "--model", model_file, "--quiet", *flags,
                            "-o", tmp_path / "out"], capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"latentdiff: error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_prompts_file_lines_and_flags_turn_the_hires_fix_on_by_giving_a_size(tmp_path):
    from latentdiff.cli import build_parser
    from latentdiff.jobs import command_jobs
    (tmp_path / "p.txt").write_text('a cat\n{"prompt": "a dog", "hr_resize_x": 128, "hr_upscaler": "Nearest"}\n')
    args = build_parser().parse_args(["txt2img", "--prompts-file", str(tmp_path / "p.txt")])
    jobs, _ = command_jobs(args, "txt2img")
    assert [(j.request.enable_hr, j.request.hr_resize_x, j.request.hr_upscaler) for j in jobs] == \
        [(False, 0, "Latent"), (True, 128, "Nearest")]
    args = build_parser().parse_args(["txt2img", "a cat", "--hr-resize-y", "128", "--hr-prompt", "a lion"])
    (job,), _ = command_jobs(args, "txt2img")
    assert (job.request.enable_hr, job.request.hr_resize_y, job.request.hr_prompt) == (True, 128, "a lion")


@pytest.mark.parametrize("first, hr, schedule", [
    (dict(sampler="Euler"), dict(hr_sampler_name="dpmpp_2m_karras"), ("DPM++ 2M", "karras")),  # its name's
    (dict(sampler="Euler", schedule="exponential"), dict(hr_sampler_name="DPM++ 2M"), ("DPM++ 2M", "exponential")),
    (dict(sampler="Euler", schedule="exponential"), dict(hr_sampler_name="DDIM", hr_scheduler="karras"),
     ("DDIM", "karras")),
    (dict(sampler="Euler a", schedule="karras"), dict(), ("Euler a", "karras")),
])
def test_the_second_pass_schedule_follows_a1111(pipe, first, hr, schedule):
    """hr_scheduler, else the hires sampler name's suffix, else the first pass's schedule if it named one (A1111's
    hr_scheduler default), else the hires sampler's own; resolved once, so a prepared request prepares the same."""
    request, _ = pipe.prepare(GenerationRequest(prompt="a", enable_hr=True, **first, **hr))
    assert (request.hr_sampler_name, request.hr_scheduler) == schedule
    again, _ = pipe.prepare(request)
    assert (again.hr_sampler_name, again.hr_scheduler) == schedule


def test_a_hires_sampler_and_schedule_are_written_where_they_differ(pipe):
    request, _ = pipe.prepare(GenerationRequest(prompt="a", sampler="Euler", enable_hr=True,
                                                hr_sampler_name="dpmpp_2m_karras"))
    assert "Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires upscale: 2" in pipe.infotext(request, 0)
    fields, unhonoured = to_fields(parse_parameters(pipe.infotext(request, 0)))
    assert (fields["hr_sampler_name"], fields["hr_scheduler"], unhonoured) == ("DPM++ 2M", "karras", [])
    same, _ = pipe.prepare(GenerationRequest(prompt="a", sampler="DPM++ 2M Karras", enable_hr=True,
                                             hr_sampler_name="DPM++ 2M Karras"))
    assert "Hires s" not in pipe.infotext(same, 0)
    automatic, _ = pipe.prepare(GenerationRequest(prompt="a", sampler="Euler", enable_hr=True, hr_sampler_name="DDIM"))
    # the first pass named none: DDIM's own schedule, not the first pass's normal, and recorded so a replay keeps it
    assert automatic.hr_scheduler != automatic.schedule == "normal"
    fields, _ = to_fields(parse_parameters(pipe.infotext(automatic, 0)))
    assert (fields["hr_sampler_name"], fields["hr_scheduler"]) == ("DDIM", automatic.hr_scheduler)
