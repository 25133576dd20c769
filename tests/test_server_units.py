"""The server's parts without HTTP: the A1111 schema mapping, the pipeline's interrupt hook, the command's
start-up checks. (tests/test_server.py drives the whole server over loopback.)"""

import base64
import io
import subprocess
import sys

import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.errors import FieldError
from latentdiff.pipeline import Interrupted, Pipeline
from latentdiff.request import FIELD_NAMES, GenerationRequest
from latentdiff.server.command import is_loopback, parse_auth
from latentdiff.server.schema import (ALIASES, NOT_IN_A1111_JSON, OFF, Caps, a1111_name, decode_image, for_model,
                                      parse_generation)
from tiny import SD1, tiny_model, with_inputs


def parse(body, mode="txt2img", **kw):
    return parse_generation(body, mode, options={"CLIP_stop_at_last_layers": 1}, checkpoint="m [abc]",
                            caps=kw.pop("caps", Caps()))


def test_every_request_field_is_mapped_or_named_as_absent_from_a1111_json():
    # a field added to GenerationRequest must get an alias line (or a reason to be absent): this names it
    unmapped = set(FIELD_NAMES) - set(ALIASES.values()) - NOT_IN_A1111_JSON
    assert not unmapped, f"add {sorted(unmapped)} to server/schema.py ALIASES (A1111 name -> field)"
    assert not set(ALIASES.values()) & NOT_IN_A1111_JSON


def test_a1111_defaults_apply_to_left_out_fields():
    parsed = parse({"prompt": "a cat"})
    r = parsed.request
    assert (r.steps, r.sampler, r.schedule, r.seed, r.cfg_scale, r.width) == (50, "Euler", None, -1, 7.0, None)
    assert parsed.send_images is True and parsed.save_images is False and parsed.ignored == []
    assert parsed.parameters["steps"] == 50 and parsed.parameters["sampler_name"] == "Euler"


def test_sampler_index_scheduler_names_and_eta():
    assert parse({"sampler_index": "DPM++ 2M Karras"}).request.sampler == "DPM++ 2M Karras"
    assert parse({"sampler_name": "Heun", "sampler_index": "Euler"}).request.sampler == "Heun"
    assert parse({"scheduler": "Uniform"}).request.schedule == "normal"  # A1111's uniform is our normal
    assert parse({"scheduler": "karras"}).request.schedule == "karras"
    assert parse({"scheduler": "Automatic"}).request.schedule is None
    # clients send eta always; A1111 hands it only to samplers that take one
    assert parse({"sampler_name": "Euler", "eta": 1.0}).request.eta is None
    assert parse({"sampler_name": "Euler a", "eta": 0.5}).request.eta == 0.5
    assert parse({"sampler_name": "Euler a", "eta": 1.0}).request.eta is None  # its own: no "Eta" written
    assert parse({"sampler_name": "DDIM", "eta": 1.0}).request.eta == 1.0


def test_off_values_are_not_reported_others_are():
    off = {name: values[0] for name, values in OFF.items()}
    assert parse({"prompt": "x", **off, "hr_scale": 2, "mask_blur": 4}).ignored == []
    on = parse({"prompt": "x", "restore_faces": True, "enable_hr": True, "hr_scale": 2, "subseed_strength": 0.3,
                "hr_checkpoint_name": "other.safetensors", "unknown_thing": 1, "override_settings":
                    {"CLIP_stop_at_last_layers": 2, "sd_vae": "a.pt", "sd_model_checkpoint": "m [abc]"}})
    assert sorted(on.ignored) == ["hr_checkpoint_name", "override_settings.sd_vae", "restore_faces",
                                  "subseed_strength", "unknown_thing"]
    assert on.request.clip_skip == 2 and on.request.enable_hr is True  # the hires fix is honoured


def test_txt2img_ignores_img2img_fields_and_img2img_reads_them():
    assert parse({"denoising_strength": 0.3, "resize_mode": 1}).ignored == []
    image = Image.new("RGB", (64, 64), "red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    b64 = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    r = parse({"init_images": [b64], "denoising_strength": 0.3, "resize_mode": 1}, "img2img").request
    assert r.strength == 0.3 and r.resize_mode == 1 and r.init_image.size == (64, 64)
    assert parse({"init_images": [b64]}, "img2img").parameters["init_images"] is None  # not echoed back


def test_errors_name_a1111_fields():
    assert a1111_name("sampler") == "sampler_name" and a1111_name("init_image") == "init_images"
    assert a1111_name("clip_skip") == "override_settings.CLIP_stop_at_last_layers"
    with pytest.raises(FieldError, match="steps") as e:
        parse({"steps": 10}, caps=Caps(max_steps=5))
    assert e.value.field == "steps"
    with pytest.raises(FieldError) as e:
        parse({"override_settings": [1]})
    assert e.value.field == "override_settings"


def test_uploaded_images_over_the_pixel_cap_are_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    assert decode_image(text, "init_image", Caps()).size == (300, 300)
    with pytest.raises(FieldError, match="over this server's cap of 100 pixels"):
        decode_image(text, "init_image", Caps(max_input_pixels=100))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# -- the editing fields: the hires fix (txt2img), inpainting and image_cfg_scale (img2img) -------------------

# what webuiapi's txt2img sends of the hires fix when it is left off (its defaults), with other values
WEBUIAPI_HIRES_OFF = {"enable_hr": False, "hr_scale": 3, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 5,
                      "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": "Heun",
                      "hr_scheduler": None, "hr_prompt": "more", "hr_negative_prompt": "", "denoising_strength": 0.3,
                      "firstphase_width": 0, "firstphase_height": 0}


def test_hires_fields_are_read_with_enable_hr_and_dropped_without():
    off = parse({"prompt": "x", **WEBUIAPI_HIRES_OFF})
    assert off.ignored == [] and off.request == parse({"prompt": "x"}).request  # as if left out
    on = parse({"prompt": "x", **WEBUIAPI_HIRES_OFF, "enable_hr": True}).request
    assert (on.enable_hr, on.hr_scale, on.hr_upscaler, on.hr_second_pass_steps, on.hr_sampler_name, on.hr_prompt,
            on.strength) == (True, 3, "Lanczos", 5, "Heun", "more", 0.3)  # txt2img's denoising_strength: the hires
    assert on.hr_scheduler is None  # null: the first pass's
    assert parse({"enable_hr": 1}).request.enable_hr is True  # A1111's API takes 0/1 too


def test_hires_sampler_and_scheduler_words():
    def hires(**fields):
        return parse({"enable_hr": True, "sampler_name": "DPM++ 2M", "scheduler": "karras", **fields}).request
    assert hires(hr_sampler_name="Use same sampler").hr_sampler_name is None
    assert hires(hr_sampler_name="").hr_sampler_name is None
    assert hires(hr_scheduler="Use same scheduler").hr_scheduler is None  # the first pass's: karras
    assert hires(hr_scheduler="").hr_scheduler is None
    assert hires(hr_scheduler="Exponential").hr_scheduler == "exponential"
    assert hires(hr_scheduler="Uniform").hr_scheduler == "normal"  # A1111's names, as for the first pass
    # "Automatic": the hires sampler's own schedule, not the first pass's karras
    own = GenerationRequest(sampler="Euler").sampler_spec[1]
    assert own != "karras" and hires(hr_sampler_name="Euler", hr_scheduler="Automatic").hr_scheduler == own
    with pytest.raises(FieldError) as e:
        hires(hr_scheduler="nope")
    assert e.value.field == "hr_scheduler" and a1111_name(e.value.field) == "hr_scheduler"


def test_hires_is_txt2img_only_and_capped():
    image = b64_png(Image.new("RGB", (64, 64)))
    i2i = parse({"init_images": [image], "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.4}, "img2img")
    assert i2i.ignored == ["enable_hr"] and not i2i.request.enable_hr and i2i.request.strength == 0.4
    with pytest.raises(FieldError) as e:
        parse({"enable_hr": True, "steps": 10, "hr_second_pass_steps": 11}, caps=Caps(max_steps=10))
    assert e.value.field == "hr_second_pass_steps"
    # the final size against the pixel cap, where the model is known (the first pass: its native size here)
    request = parse({"enable_hr": True, "hr_scale": 2}).request
    assert for_model(request, SD1, Caps(max_pixels=128 * 128)) is request  # 64 x 2 on the tiny model
    with pytest.raises(FieldError, match="hires size of 256x256: over this server's cap") as e:
        for_model(parse({"enable_hr": True, "hr_scale": 4}).request, SD1, Caps(max_pixels=128 * 128))
    assert e.value.field == "hr_scale"


def test_firstphase_sizes_replace_width_and_height_as_in_a1111():
    r = parse({"width": 512, "height": 512, "firstphase_width": 64, "firstphase_height": 128, "enable_hr": True})
    assert (r.request.width, r.request.height, r.ignored) == (64, 128, [])
    with pytest.raises(FieldError, match="other firstphase side") as e:
        parse({"firstphase_width": 64})
    assert e.value.field == "firstphase_height"
    image = b64_png(Image.new("RGB", (64, 64)))
    assert parse({"init_images": [image], "firstphase_width": 64, "firstphase_height": 64}, "img2img").ignored == \
        ["firstphase_width", "firstphase_height"]  # A1111's img2img has no first pass


def test_mask_fields_take_a1111s_img2img_defaults_only_with_a_mask():
    image = b64_png(Image.new("RGB", (64, 64)))
    plain = parse({"init_images": [image], "inpaint_full_res": True, "mask_blur": 9, "mask_round": False}, "img2img")
    assert plain.ignored == [] and plain.request == parse({"init_images": [image]}, "img2img").request
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (16, 16, 48, 48))  # opaque = repaint, as A1111 reads a painted mask's alpha
    masked = parse({"init_images": [image], "mask": b64_png(mask), "mask_round": False}, "img2img")
    r = masked.request
    assert r.mask.mode == "RGBA" and r.mask.getpixel((20, 20)) == (0, 0, 0, 255)
    # StableDiffusionProcessingImg2Img's defaults, not the request's (original, whole picture, 32 px)
    assert (r.mask_blur, r.inpainting_fill, r.inpaint_full_res, r.inpaint_full_res_padding,
            r.inpainting_mask_invert) == (4, 0, True, 0, False)
    assert masked.ignored == ["mask_round"] and masked.parameters["mask"] is None
    assert masked.parameters["inpaint_full_res"] is True
    given = parse({"init_images": [image], "mask": b64_png(mask), "inpainting_fill": 2, "inpaint_full_res": 0,
                   "inpaint_full_res_padding": 16, "inpainting_mask_invert": 1}, "img2img").request
    assert (given.inpainting_fill, given.inpaint_full_res, given.inpaint_full_res_padding,
            given.inpainting_mask_invert) == (2, False, 16, True)
    assert parse({"mask": b64_png(mask), "prompt": "x"}).ignored == ["mask"]  # txt2img has no mask


def test_mask_blur_x_and_y_as_a1111_reads_them():
    body = {"init_images": [b64_png(Image.new("RGB", (64, 64)))], "mask": b64_png(Image.new("L", (64, 64), 255))}
    assert parse({**body, "mask_blur_x": 7, "mask_blur_y": 7}, "img2img").request.mask_blur == 7
    assert parse({**body, "mask_blur": 2, "mask_blur_x": 7, "mask_blur_y": 3}, "img2img").request.mask_blur == 2
    with pytest.raises(FieldError, match="differs from mask_blur_x 7") as e:
        parse({**body, "mask_blur_x": 7, "mask_blur_y": 3}, "img2img")
    assert e.value.field == "mask_blur_y"
    for text, words in (("not base64!", "not valid base64"), (base64.b64encode(b"no image").decode(), "decode")):
        with pytest.raises(FieldError, match=words) as e:
            parse({**body, "mask": text}, "img2img")
        assert e.value.field == "mask"


def test_image_cfg_scale_counts_on_instructpix2pix_models_only():
    image = b64_png(Image.new("RGB", (64, 64)))
    request = parse({"init_images": [image], "image_cfg_scale": 1.5}, "img2img").request
    assert request.image_cfg_scale == 1.5
    assert for_model(request, with_inputs(SD1, 8), Caps()).image_cfg_scale == 1.5
    ordinary = for_model(request, SD1, Caps())
    assert ordinary.image_cfg_scale is None and ordinary.replace(image_cfg_scale=1.5) == request
    assert parse({"image_cfg_scale": 1.5}).request.image_cfg_scale is None  # txt2img has none


# -- the pipeline's interrupt hook ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return Pipeline(tiny_model(SD1), device="cpu", dtype=torch.float32, threads=1)


def test_interrupt_decodes_the_current_denoised_latents_and_stops(tiny):
    seen = []

    def stop_at_3(info):
        seen.append(info["i"])
        if info["i"] == 2:
            seen.append(info["denoised"].clone())
            raise Interrupted(info["denoised"], info["i"])
    result = tiny.generate(GenerationRequest(prompt="x", steps=10, seed=1, n_iter=3), callback=stop_at_3,
                           progress=False, return_latents=True)
    assert seen[:3] == [0, 1, 2] and len(seen) == 4  # no step after the interrupt, no later iteration
    assert len(result.images) == 1 and result.notes == ["iteration 1: interrupted at step 3"]
    assert torch.equal(result.latents, seen[3])
    assert result.images[0].tobytes() == tiny.decode(seen[3])[0][0].tobytes()


def test_skip_ends_the_current_iteration_and_runs_the_next(tiny):
    def skip_first(info):
        if info["i"] == 1 and not skipped:
            skipped.append(True)
            raise Interrupted(info["denoised"], info["i"], skip=True)
    skipped = []
    result = tiny.txt2img("x", steps=4, seed=1, n_iter=2, callback=skip_first, progress=False)
    full = tiny.txt2img("x", steps=4, seed=2, progress=False)
    assert result.seeds == [1, 2] and result.notes == ["iteration 1: skipped at step 2"]
    assert result.images[1].tobytes() == full.images[0].tobytes()  # the next iteration ran in full


# -- the command ------------------------------------------------------------------------------------

def test_other_addresses_need_auth_or_an_explicit_flag(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-auth USER:PASS, or --insecure-listen" in capsys.readouterr().err
    assert main(["serve", "--api-auth", "nopassword"]) == 2
    assert "--api-auth: 'nopassword' is not USER:PASS" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such.safetensors"]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["serve", "-o", __file__ + "/out"]) == 2
    assert "is not a writable folder" in capsys.readouterr().err
    assert parse_auth("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_insecure_listen_warns_and_serves_on_that_address(monkeypatch, caplog, tmp_path):
    import uvicorn
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    assert main(["serve", "--host", "0.0.0.0", "--port", "7999", "--insecure-listen", "--threads", "1",
                 "--model-dir", str(tmp_path)]) == 0
    assert (served["host"], served["port"]) == ("0.0.0.0", 7999)
    assert "listening on 0.0.0.0 without --api-auth" in caplog.text
    served["app"].state.worker.close()


def test_importing_latentdiff_and_its_cli_needs_no_server_packages():
    code = "import sys, latentdiff, latentdiff.cli; latentdiff.cli.build_parser(); " \
           "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_hires_pass_counts_as_a_job_of_its_own():
    from latentdiff.server.worker import Job
    job = Job("txt2img", iterations=4, steps=(6, 3))  # n_iter 2, second passes of 3 steps
    on_step, seen = job.callback(None), []
    for passes in range(2):
        for steps in (6, 3):
            for i in range(steps):
                on_step({"i": i, "denoised": None})
                seen.append((job.iteration, job.steps, round(job.fraction(), 3)))
    assert seen[5] == (0, 6, 0.25) and seen[6] == (1, 3, round((1 + 1 / 3) / 4, 3)) and seen[-1] == (3, 3, 1.0)


def test_previews_are_decoded_when_asked_at_most_every_ten_steps():
    from latentdiff.server.worker import PREVIEW_EVERY, Job
    decoded = []

    class Decoder:
        def decode(self, latents):
            decoded.append(job.done)
            return [Image.new("RGB", (8, 8))], []
    job = Job("txt2img", iterations=1, steps=40)
    on_step = job.callback(Decoder())
    for i in range(40):
        job.preview_wanted = True  # a client polling faster than the steps run
        on_step({"i": i, "denoised": torch.zeros(1, 4, 1, 1)})
    assert PREVIEW_EVERY == 10 and decoded == [1, 11, 21, 31]
    assert Image.open(io.BytesIO(base64.b64decode(job.preview))).size == (8, 8)
    assert job.fraction() == 1.0
