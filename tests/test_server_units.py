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
from latentdiff.server.schema import (ALIASES, NOT_IN_A1111_JSON, OFF, Caps, a1111_name, decode_image,
                                      parse_generation)
from tiny import SD1, tiny_model


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
                "unknown_thing": 1, "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "a.pt",
                                                          "sd_model_checkpoint": "m [abc]"}})
    assert sorted(on.ignored) == ["enable_hr", "hr_scale", "override_settings.sd_vae", "restore_faces",
                                  "subseed_strength", "unknown_thing"]
    assert on.request.clip_skip == 2


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


def test_an_image_field_given_an_alias_arrives_decoded(monkeypatch):
    # what the inpainting issue's one alias line ("mask": "mask") gives: the base64 mask as a PIL image
    import latentdiff.server.schema as schema
    monkeypatch.setitem(schema.ALIASES, "mask", "mask")
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buffer, format="PNG")
    fields = {}
    monkeypatch.setattr(schema, "GenerationRequest", lambda **kw: fields.update(kw) or FakeRequest())
    parse({"mask": base64.b64encode(buffer.getvalue()).decode()})
    assert isinstance(fields["mask"], Image.Image) and fields["mask"].size == (64, 64)


class FakeRequest:  # stands in for a request type that has the field
    steps, width, height, prompt, batch_size, n_iter = 20, None, None, "", 1, 1

    def validate(self):
        return self
