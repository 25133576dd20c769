"""`latentdiff serve` over real loopback HTTP: driven by the webuiapi client from PyPI (as A1111 users drive
A1111) and by plain HTTP requests shaped as A1111's API documentation shows them. The bundled demo model
(64x64, a few ms a step) keeps every generation short."""

import base64
import io
import json
import shutil
import threading
import time

import httpx
import pytest
import torch
import webuiapi
from PIL import Image

from latentdiff.infotext import parse_parameters
from latentdiff.pipeline import Pipeline
from latentdiff.request import GenerationRequest
from latentdiff.resources import demo_model
from latentdiff.server.app import ServerConfig, create_app
from latentdiff.server.command import Background
from latentdiff.server.schema import Caps
from tiny import SD1, tiny_model, with_inputs


@pytest.fixture(scope="module")
def pipeline():
    return Pipeline.from_pretrained(demo_model(), threads=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(demo_model(), folder / "other.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(pipeline, model_dir, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("outputs")
    app = create_app(ServerConfig(model=demo_model(), model_dir=model_dir, outdir=outdir, queue_size=2,
                                  caps=Caps(max_steps=400), max_body_bytes=2 * 2**20,
                                  pipeline_options=dict(threads=1)), pipeline=pipeline)
    running = Background(app)
    running.outdir, running.worker = outdir, app.state.worker
    yield running
    running.stop()


@pytest.fixture
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=8)


def png_parameters(image: Image.Image) -> dict:
    info = parse_parameters(image.info["parameters"])
    return {"prompt": info.prompt, "negative": info.negative_prompt, **info.params}


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(server, path, body, timeout=120):
    return httpx.post(f"{server.url}/sdapi/v1/{path}", json=body, timeout=timeout)


# -- webuiapi, unchanged -----------------------------------------------------------------------------

def test_webuiapi_txt2img_returns_images_carrying_their_infotext(api):
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, batch_size=2, width=64,
                         height=64, cfg_scale=5)
    assert len(result.images) == 2
    assert result.info["all_seeds"] == [11, 12] and result.info["seed"] == 11
    for image, seed, text in zip(result.images, (11, 12), result.info["infotexts"]):
        params = png_parameters(image)
        assert image.size == (64, 64)
        assert params["prompt"] == "a red circle" and params["negative"] == "blue"
        assert params["Seed"] == str(seed) and params["Steps"] == "8" and params["Sampler"] == "Euler a"
        assert params["CFG scale"] == "5" and image.info["parameters"] == text
    assert result.parameters["prompt"] == "a red circle"
    # webuiapi sends A1111's fields latentdiff has no use for, all off: none is reported as ignored
    assert result.info["ignored_fields"] == []


def test_a_seed_gives_the_python_apis_image(api, pipeline):
    result = api.txt2img(prompt="a green square", seed=5, width=64, height=64, sampler_name="DPM++ 2M",
                         scheduler="karras", steps=6)
    expected = pipeline.txt2img("a green square", seed=5, steps=6, sampler="DPM++ 2M", schedule="karras",
                                progress=False).images[0]
    assert list(result.images[0].convert("RGB").getdata()) == list(expected.getdata())
    assert png_parameters(result.images[0])["Schedule type"] == "Karras"


def test_webuiapi_img2img_and_png_info(api):
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    result = api.img2img(images=[start], prompt="a blue circle", denoising_strength=0.5, seed=4, width=64,
                         height=64)
    params = png_parameters(result.images[0])
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "4"
    info = api.png_info(result.images[0])
    assert info.info == result.images[0].info["parameters"]
    assert info.json["parameters"]["Prompt"] == "a blue circle"
    assert info.json["parameters"]["Size-1"] == "64"


def test_webuiapi_options_samplers_schedulers_and_model_switch(api):
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M" in api.util_get_sampler_names()
    assert {"automatic", "karras", "uniform"} <= set(api.util_get_scheduler_names())
    titles = api.util_get_model_names()
    assert any(t.startswith("other.safetensors") for t in titles)
    start = api.util_get_current_model()
    api.util_set_model("other.safetensors", find_closest=False)
    try:
        assert api.util_get_current_model().startswith("other.safetensors [")
        result = api.txt2img(prompt="a star", seed=1, width=64, height=64, steps=2)
        assert png_parameters(result.images[0])["Model"] == "other"
        api.set_options({"CLIP_stop_at_last_layers": 2})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        result = api.txt2img(prompt="a star", seed=1, width=64, height=64, steps=2)
        assert png_parameters(result.images[0])["Clip skip"] == "2"
    finally:
        api.set_options({"sd_model_checkpoint": start, "CLIP_stop_at_last_layers": 1})
    assert api.util_get_current_model() == start


def _wait_for_steps(server, at_least: int):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]
        if state["sampling_step"] >= at_least:
            return state
        time.sleep(0.05)
    raise AssertionError("the job never started")


def _in_background(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn()))
    thread.start()
    return thread, out


def test_webuiapi_interrupt_returns_the_current_image(api, server):
    thread, out = _in_background(lambda: api.txt2img(prompt="a circle", seed=2, width=64, height=64, steps=400,
                                                     n_iter=2))
    state = _wait_for_steps(server, 3)
    assert state["job_count"] == 2 and state["sampling_steps"] == 400
    api.interrupt()
    thread.join(60)
    result = out["result"]
    assert len(result.images) == 1  # the second iteration never ran
    assert any("interrupted at step" in note for note in result.info["notes"])
    assert httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_skip_moves_on_to_the_next_iteration(api, server):
    thread, out = _in_background(lambda: api.txt2img(prompt="a circle", seed=2, width=64, height=64, steps=60,
                                                     n_iter=2))
    _wait_for_steps(server, 2)
    api.skip()
    thread.join(60)
    result = out["result"]
    assert result.info["all_seeds"] == [2, 3]
    assert [n.startswith("iteration 1: skipped") for n in result.info["notes"]] == [True]


def test_progress_reports_steps_and_a_preview(server):
    thread, _ = _in_background(lambda: post(server, "txt2img", {"prompt": "x", "steps": 300, "width": 64,
                                                                "height": 64}))
    _wait_for_steps(server, 1)
    deadline, image = time.monotonic() + 30, None
    while image is None and time.monotonic() < deadline:
        body = httpx.get(f"{server.url}/sdapi/v1/progress", params={"skip_current_image": "false"}).json()
        image = body["current_image"]
        time.sleep(0.05)
    assert 0 < body["progress"] < 1 and body["eta_relative"] >= 0
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (64, 64)
    httpx.post(f"{server.url}/sdapi/v1/interrupt")
    thread.join(60)


# -- the editing fields through webuiapi: the hires fix, inpainting ---------------------------------------

def test_webuiapi_txt2img_with_the_hires_fix(api, pipeline):
    result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, steps=4, enable_hr=True, hr_scale=2,
                         denoising_strength=0.5, hr_second_pass_steps=3)
    image = result.images[0]
    assert image.size == (128, 128)
    params = png_parameters(image)
    assert (params["Hires upscale"], params["Hires upscaler"], params["Hires steps"], params["Denoising strength"],
            params["Size"]) == ("2", "Latent", "3", "0.5", "64x64")  # Size: the first pass's, as A1111 writes it
    assert result.info["ignored_fields"] == [] and result.info["denoising_strength"] == 0.5
    expected = pipeline.txt2img("a red circle", seed=3, width=64, height=64, steps=4, sampler="Euler a",
                                enable_hr=True, hr_scale=2, strength=0.5, hr_second_pass_steps=3, progress=False)
    assert list(image.convert("RGB").getdata()) == list(expected.images[0].getdata())


def test_hires_fields_with_enable_hr_false_are_dropped(api):
    result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, steps=2, enable_hr=False, hr_scale=3,
                         hr_upscaler="Lanczos", hr_second_pass_steps=5, hr_sampler_name="Heun", hr_prompt="blue",
                         denoising_strength=0.3)
    image = result.images[0]
    assert image.size == (64, 64) and result.info["ignored_fields"] == []
    assert not [key for key in png_parameters(image) if key.startswith("Hires") or key == "Denoising strength"]


def test_webuiapi_img2img_with_a_mask_repaints_as_the_python_api(api, pipeline):
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    start.paste((30, 30, 200), (0, 0, 32, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    result = api.img2img(images=[start], mask_image=mask, prompt="a green square", seed=6, steps=8, width=64,
                         height=64, denoising_strength=0.9)
    image = result.images[0].convert("RGB")
    # webuiapi sends A1111's defaults: fill, only masked, no padding, blur 4
    request = GenerationRequest(prompt="a green square", seed=6, steps=8, sampler="Euler a", width=64, height=64,
                                strength=0.9, init_image=start, mask=mask, mask_blur=4, inpainting_fill=0,
                                inpaint_full_res=True, inpaint_full_res_padding=0)
    expected = pipeline.generate(request, progress=False).images[0]
    assert list(image.getdata()) == list(expected.getdata())
    # repainted inside the mask; outside it, beyond the blur, the init image's own pixels
    assert image.getpixel((32, 32)) != start.getpixel((32, 32))
    assert image.getpixel((2, 2)) == start.getpixel((2, 2)) and image.getpixel((61, 61)) == start.getpixel((61, 61))
    params = png_parameters(result.images[0])
    assert (params["Mask blur"], params["Masked content"], params["Inpaint area"],
            params["Masked area padding"]) == ("4", "fill", "Only masked", "0")
    assert result.info["ignored_fields"] == []


def test_image_cfg_scale_is_honoured_on_instructpix2pix_models_and_has_no_effect_on_others(api, pipeline):
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    plain = api.img2img(images=[start], prompt="x", seed=1, steps=2, width=64, height=64, image_cfg_scale=1.25)
    assert "Image CFG scale" not in png_parameters(plain.images[0]) and plain.info["ignored_fields"] == []
    instruct = Pipeline(tiny_model(with_inputs(SD1, 8)), device="cpu", dtype=torch.float32, threads=1)
    running = Background(create_app(ServerConfig(model=demo_model()), pipeline=instruct))
    try:
        host, port = running.url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)
        result = client.img2img(images=[start], prompt="make it blue", seed=1, width=64, height=64,
                                image_cfg_scale=1.25, denoising_strength=1.0)
    finally:
        running.stop()
    assert png_parameters(result.images[0])["Image CFG scale"] == "1.25"
    expected = instruct.img2img(start, "make it blue", seed=1, steps=2, sampler="Euler a", image_cfg_scale=1.25,
                                strength=1.0, width=64, height=64, progress=False).images[0]
    assert list(result.images[0].convert("RGB").getdata()) == list(expected.getdata())


@pytest.mark.parametrize("mask, words", [("not base64!", "base64"),
                                         (base64.b64encode(b"not an image").decode(), "decode"), (7, "string")])
def test_a_bad_mask_is_422_naming_mask(server, mask, words):
    start = b64_png(Image.new("RGB", (64, 64)))
    response = post(server, "img2img", {"prompt": "x", "init_images": [start], "mask": mask})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "mask"] and words in detail["msg"]


# -- plain HTTP as A1111's documentation shows it ------------------------------------------------------

def test_plain_http_txt2img_as_a1111_docs(server):
    # the payload of A1111's wiki page "API": prompt and steps only; everything else takes A1111's defaults
    response = post(server, "txt2img", {"prompt": "puppy dog", "steps": 5})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert body["parameters"]["sampler_name"] == "Euler" and body["parameters"]["seed"] == -1
    assert info["sampler_name"] == "Euler" and info["steps"] == 5 and len(info["all_seeds"]) == 1
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert png_parameters(image)["Seed"] == str(info["seed"])


def test_plain_http_img2img_with_raw_base64_and_a_resize_mode(server):
    start = Image.new("RGB", (96, 64), (30, 30, 200))
    body = {"init_images": [b64_png(start)], "prompt": "a red square", "steps": 10, "denoising_strength": 0.6,
            "width": 64, "height": 64, "resize_mode": 1, "seed": 9, "include_init_images": True}
    response = post(server, "img2img", body)
    assert response.status_code == 200, response.text
    result = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
    assert image.size == (64, 64)  # "crop and resize" from 96x64
    params = png_parameters(image)
    assert params["Denoising strength"] == "0.6" and params["Seed"] == "9" and params["Steps"] == "10"
    assert json.loads(result["info"])["denoising_strength"] == 0.6
    assert result["parameters"]["init_images"] == body["init_images"]  # include_init_images: echoed


def test_unhonoured_fields_are_accepted_and_listed(server):
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "restore_faces": True, "styles": ["s"],
            "enable_hr": False, "hr_scale": 2, "tiling": False, "my_extension_field": 1, "send_images": False,
            "override_settings": {"sd_vae": "x.pt"}}
    response = post(server, "txt2img", body)
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert sorted(info["ignored_fields"]) == sorted(["restore_faces", "styles", "my_extension_field",
                                                     "override_settings.sd_vae"])
    assert response.json()["images"] == []  # send_images false


def test_save_images_never_overwrites(server):
    for _ in range(2):
        assert post(server, "txt2img", {"prompt": "x", "steps": 2, "seed": 77, "width": 64, "height": 64,
                                        "save_images": True}).status_code == 200
    saved = sorted(p.name for p in server.outdir.glob("*.png"))
    assert saved == ["77-1.png", "77.png"]
    assert "Seed: 77" in Image.open(server.outdir / "77.png").info["parameters"]
    assert not list(server.outdir.glob(".*"))  # no temporary file left


def test_lists_clients_read(server):
    get = lambda path: httpx.get(f"{server.url}/sdapi/v1/{path}").json()  # noqa: E731
    assert get("scripts") == {"txt2img": [], "img2img": []} and get("script-info") == []
    assert get("upscalers") == [] and get("loras") == [] and get("embeddings") == {"loaded": {}, "skipped": {}}
    memory = get("memory")
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and "cuda" in memory
    models = get("sd-models")
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert models[0]["hash"] and models[0]["sha256"].startswith(models[0]["hash"])
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-checkpoints").status_code == 200
    samplers = get("samplers")
    assert {"name": "Euler a", "aliases": ["k_euler_a"], "options": {}} in samplers


# -- bad requests: 422 / 413 naming what is wrong, and the server carries on ------------------------------

@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "x", "steps": "many"}, "steps", "integer"),
    ({"prompt": "x", "steps": 0}, "steps", ">= 1"),
    ({"prompt": "x", "steps": 401}, "steps", "cap of 400"),
    ({"prompt": "x", "width": 8192, "height": 64}, "width", "between 64 and 4096"),
    ({"prompt": "x", "width": 4096, "height": 4096}, "width", "cap"),
    ({"prompt": "x", "width": 100, "height": 64}, "width", "multiple of 16"),  # the demo model's
    ({"prompt": "x", "cfg_scale": "high"}, "cfg_scale", "number"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler_name", "unknown sampler"),
    ({"prompt": "x", "scheduler": "nope"}, "scheduler", "unknown scheduler"),
    ({"prompt": "x", "batch_size": 8, "n_iter": 9}, "n_iter", "cap of 64"),
    ({"prompt": "x", "send_images": "yes"}, "send_images", "true or false"),
    ({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 40}}, "override_settings", "clip"),
])
def test_bad_txt2img_fields_are_422_naming_the_field(server, body, field, words):
    response = post(server, "txt2img", body)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"][:2] == ["body", field] and words.lower() in detail["msg"].lower(), detail


@pytest.mark.parametrize("images, words", [
    (None, "missing"), (["not base64!"], "base64"), ([base64.b64encode(b"not an image").decode()], "decode"),
    ("abc", "list"),
])
def test_bad_init_images_are_422(server, images, words):
    response = post(server, "img2img", {"prompt": "x", "init_images": images})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "init_images"] and words in detail["msg"]


def test_malformed_json_oversized_body_and_server_still_answers(server):
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b'{"prompt": ', timeout=30)
    assert response.status_code == 422 and "not valid JSON" in response.json()["detail"][0]["msg"]
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=b"[1]", timeout=30)
    assert response.status_code == 422 and "JSON object" in response.json()["detail"][0]["msg"]
    huge = {"prompt": "x", "init_images": ["A" * (3 * 2**20)]}
    response = post(server, "img2img", huge)
    assert response.status_code == 413 and "--max-body-mb" in response.json()["detail"]
    response = post(server, "png-info", {"image": "%%%"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "image"]
    response = post(server, "options", {"sd_model_checkpoint": "../../etc/passwd"})
    assert response.status_code == 422 and "not found" in response.json()["detail"]
    assert post(server, "txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64}).status_code == 200


def test_a_failing_job_returns_its_error_and_the_next_job_runs(server, monkeypatch):
    from latentdiff.errors import GenerationError

    def broken(latents):
        raise GenerationError("the decoded image contains NaN/Inf even in float32")
    monkeypatch.setattr(server.worker.pipeline, "decode", broken)  # the loaded model (switched back and forth)
    response = post(server, "txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64})
    assert response.status_code == 500 and "NaN" in response.json()["detail"]
    monkeypatch.undo()
    assert post(server, "txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64}).status_code == 200


def test_queue_full_is_503_with_retry_after_and_a_gone_client_does_not_hurt(server):
    long = {"prompt": "x", "steps": 400, "width": 64, "height": 64}
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up: its job still runs, then the next
        post(server, "txt2img", long, timeout=httpx.Timeout(30, read=0.5))
    waiting = [_in_background(lambda: post(server, "txt2img", {**long, "steps": 1})) for _ in range(2)]
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/sdapi/v1/progress").json()["queued"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    response = post(server, "txt2img", long)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    httpx.post(f"{server.url}/sdapi/v1/interrupt")
    for thread, out in waiting:
        thread.join(60)
        assert out["result"].status_code == 200


# -- security: authentication, CORS -----------------------------------------------------------------------

def test_api_auth_and_cors(pipeline):
    app = create_app(ServerConfig(model=demo_model(), api_auth={"ann": "s3cret"},
                                  cors_origins=("http://example.org",)), pipeline=pipeline)
    running = Background(app)
    try:
        url = f"{running.url}/sdapi/v1/options"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, auth=("ann", "wrong")).status_code == 401
        assert httpx.get(f"{running.url}/", auth=("bob", "s3cret")).status_code == 401
        response = httpx.get(url, auth=("ann", "s3cret"), headers={"Origin": "http://example.org"})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://example.org"
        host, port = running.url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), username="ann", password="s3cret")
        assert "Euler a" in client.util_get_sampler_names()
    finally:
        running.stop()


def test_cors_is_off_by_default(server):
    response = httpx.get(f"{server.url}/sdapi/v1/options", headers={"Origin": "http://example.org"})
    assert "access-control-allow-origin" not in response.headers


def test_the_page_and_only_its_files_are_served(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(f"{server.url}/static/app.js").status_code == 200
    for name in ("..%2Fapp.py", "index.html", "..%2F..%2Fpipeline.py"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 404
