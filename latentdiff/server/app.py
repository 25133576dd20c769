"""The routes: AUTOMATIC1111's /sdapi/v1 API over the worker, and the web page at /."""

import asyncio
import base64
import binascii
import io
import secrets
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from ..checkpoint import file_sha256
from ..errors import FieldError, InputError, LatentDiffError
from ..images import png_bytes, save_png
from ..infotext import parse_parameters
from ..sampling import sampler_names
from . import checkpoints
from .schema import Caps, a1111_name, for_model, info_json, parse_body, parse_generation, scheduler_entries
from .worker import Job, QueueFull, Worker

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# A1111 lists clients read; latentdiff has none of these
EMPTY_LISTS = ("upscalers", "script-info", "prompt-styles", "sd-vae", "hypernetworks", "face-restorers",
               "realesrgan-models", "latent-upscale-modes")


@dataclass
class ServerConfig:
    model: Path
    model_dir: Path | None = None
    outdir: Path = Path("outputs")
    caps: Caps = field(default_factory=Caps)
    max_body_bytes: int = 32 * 2**20
    queue_size: int = 16
    api_auth: dict[str, str] = field(default_factory=dict)  # user -> password
    cors_origins: tuple[str, ...] = ()
    pipeline_options: dict = field(default_factory=dict)  # Pipeline.from_pretrained's keywords


class Models:
    """The model folder's checkpoints, their hashes once known, and loading one."""

    def __init__(self, config: ServerConfig):
        self.config, self.hashes, self.sha256 = config, {}, {}
        self.refresh()

    def refresh(self) -> None:
        self.list = checkpoints.scan(self.config.model_dir, self.config.model)

    def load(self, checkpoint):
        from ..pipeline import Pipeline
        pipeline = Pipeline.from_pretrained(checkpoint.path, **self.config.pipeline_options)
        self.hashes[checkpoint.path] = pipeline.model_hash
        if checkpoint.path.is_file():
            self.sha256[checkpoint.path] = file_sha256(checkpoint.path)
        return pipeline

    def title(self, checkpoint) -> str:
        return checkpoint.title(self.hashes.get(checkpoint.path))

    def entry(self, checkpoint) -> dict:
        return dict(title=self.title(checkpoint), model_name=checkpoint.model_name,
                    hash=self.hashes.get(checkpoint.path), sha256=self.sha256.get(checkpoint.path),
                    filename=str(checkpoint.path), config=None)


def error_response(e: Exception) -> JSONResponse:
    """A library error as A1111 answers: 422 with FastAPI's `detail` list naming the field for bad input."""
    if isinstance(e, FieldError):
        name = a1111_name(e.field)
        detail = [{"loc": ["body", *name.split(".")] if name != "body" else ["body"], "msg": f"{name} {e.problem}",
                   "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)
    if isinstance(e, InputError):
        return JSONResponse({"detail": str(e)}, status_code=422)
    if isinstance(e, QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})
    # GenerationError (NaN images), a bad checkpoint, anything unforeseen: the job failed, the server carries on
    return JSONResponse({"error": type(e).__name__, "detail": str(e), "body": "", "errors": str(e)},
                        status_code=500)


def create_app(config: ServerConfig, *, pipeline=None) -> FastAPI:
    """The app, with the model loaded (or `pipeline`, already loaded from config.model) and its worker started."""
    models = Models(config)
    initial = models.list[0]
    pipeline = pipeline if pipeline is not None else models.load(initial)
    models.hashes.setdefault(initial.path, pipeline.model_hash)
    worker = Worker(pipeline, initial, queue_size=config.queue_size)
    options = {"CLIP_stop_at_last_layers": 1}
    options_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="latentdiff", lifespan=lifespan,
                  dependencies=[Depends(_basic_auth(config.api_auth))] if config.api_auth else [])
    app.state.worker = worker
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=bool(config.api_auth))

    async def read_json(request: Request) -> dict:
        """The body as JSON, refused past the size cap without reading it all."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise _TooLarge(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise _TooLarge(size)
            chunks.append(chunk)
        return parse_body(b"".join(chunks) or b"{}")

    @app.exception_handler(_TooLarge)
    async def too_large(request, e):
        return JSONResponse({"detail": f"body: the request is over this server's cap of "
                                       f"{config.max_body_bytes} bytes (--max-body-mb)"}, status_code=413)

    @app.exception_handler(LatentDiffError)
    async def library_error(request, e):
        return error_response(e)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e):
        return error_response(e)

    @app.exception_handler(Exception)
    async def unforeseen(request, e):  # logged with its traceback by the server; the client gets its message
        return error_response(e)

    async def generate(mode: str, request: Request):
        body = await read_json(request)
        with options_lock:
            parsed = parse_generation(body, mode, options=options, checkpoint=models.title(worker.checkpoint),
                                      caps=config.caps)
        req = parsed.request
        steps = req.steps if mode == "txt2img" else min(req.steps, int(req.steps * req.strength))
        passes = (steps, req.hr_second_pass_steps or req.steps) if req.enable_hr else (steps,)  # A1111 counts
        job = Job(mode, iterations=req.n_iter * len(passes), steps=passes)  # the hires pass as a job of its own

        def task(worker, job):
            pipe = worker.pipeline
            result = pipe.generate(for_model(req, pipe.config, config.caps), callback=job.callback(pipe),
                                   progress=False)
            infotexts = [pipe.infotext(result.request, i) for i in range(len(result.images))]
            return result, infotexts, worker.checkpoint, pipe.model_hash

        result, infotexts, checkpoint, model_hash = await asyncio.wrap_future(worker.submit(task, job))
        return await run_in_threadpool(respond, parsed, result, infotexts, checkpoint, model_hash)

    def respond(parsed, result, infotexts, checkpoint, model_hash) -> dict:
        if parsed.save_images:
            for image, seed, text in zip(result.images, result.seeds, infotexts):
                save_png(image, config.outdir, str(seed), text)
        images = [base64.b64encode(png_bytes(image, text)).decode("ascii")
                  for image, text in zip(result.images, infotexts)] if parsed.send_images else []
        info = info_json(result, parsed.request, infotexts, model_name=Path(checkpoint.name).stem,
                         model_hash=model_hash, ignored=parsed.ignored)
        return {"images": images, "parameters": parsed.parameters, "info": info}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate("txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate("img2img", request)

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        body = await read_json(request)
        return _png_info(body.get("image"), config.caps)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return worker.progress(want_preview=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        worker.interrupt()

    @app.post("/sdapi/v1/skip")
    def skip():
        worker.skip()

    @app.get("/sdapi/v1/options")
    def get_options():
        path = worker.checkpoint.path
        with options_lock:
            vae = worker.pipeline.vae_source
            return {"sd_model_checkpoint": models.title(worker.checkpoint), "sd_checkpoint_hash":
                    models.sha256.get(path), "sd_vae": vae.name if vae else "Automatic", "samples_format": "png",
                    "outdir_samples": str(config.outdir), **options}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await read_json(request)
        ignored = [key for key in body if key not in ("sd_model_checkpoint", *options)]
        if "CLIP_stop_at_last_layers" in body:
            value = body["CLIP_stop_at_last_layers"]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
                raise FieldError("CLIP_stop_at_last_layers", f"must be an integer from 1 to 12, not {value!r}")
        if "sd_model_checkpoint" in body:
            wanted = checkpoints.find(models.list, body["sd_model_checkpoint"], models.hashes)
            if wanted.path != worker.checkpoint.path:
                def switch(worker, job):  # between jobs; a model that fails to load leaves the old one
                    worker.pipeline, worker.checkpoint = models.load(wanted), wanted
                await asyncio.wrap_future(worker.submit(switch, Job("load model")))
        with options_lock:
            options.update({key: body[key] for key in options if key in body})
        return {"ignored": ignored}

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [models.entry(c) for c in models.list]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        models.refresh()

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": name, "aliases": [_k_alias(name)], "options": {}} for name in sampler_names()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}] + \
               [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if "karras" in name else -1,
                 "need_inner_model": False} for name, label in scheduler_entries()]

    @app.get("/sdapi/v1/loras")
    def loras():
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p, _, _ in worker.pipeline.loras]

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        found = worker.pipeline.embeddings
        return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": e.width, "vectors": e.vectors.shape[0]} for name, e in found.items()},
                "skipped": {}}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    for name in EMPTY_LISTS:
        app.add_api_route(f"/sdapi/v1/{name}", lambda: [], methods=["GET"])

    @app.get("/sdapi/v1/memory")
    def memory():
        total, rss = psutil.virtual_memory().total, psutil.Process().memory_info().rss
        body = {"ram": {"free": total - rss, "used": rss, "total": total}}  # A1111's: used is this process's
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            body["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                            "allocated": {"current": torch.cuda.memory_allocated(),
                                          "peak": torch.cuda.max_memory_allocated()}}
        else:
            body["cuda"] = {"error": "no CUDA device"}
        return body

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def page_file(name: str):
        if name not in PAGE_FILES:  # three known files: no path from a request reaches the filesystem
            raise HTTPException(404, f"no page file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name])

    return app


class _TooLarge(Exception):
    pass


def _k_alias(name: str) -> str:
    """A sampler's k-diffusion style alias as A1111 lists it (k_euler_a, k_dpmpp_2m; ddim, plms, unipc)."""
    key = name.lower().replace("++", "pp").replace(" ", "_")
    return key if key in ("ddim", "plms", "unipc", "ddpm", "lcm") else f"k_{key}"


def _basic_auth(users: dict[str, str]):
    """HTTP basic authentication against --api-auth's users, as A1111's --api-auth."""
    def check(request: Request):
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        expected = users.get(user)
        ok = scheme.lower() == "basic" and expected is not None and secrets.compare_digest(
            password.encode(), expected.encode())
        if not ok:
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
    return check


def _png_info(image_text, caps: Caps) -> dict:
    """A1111's png-info: the `parameters` text (info), every text chunk (items) and the parsed parameters."""
    if not isinstance(image_text, str) or not image_text:
        raise FieldError("image", "is missing: send the image as a base64 string in `image`")
    text = image_text.partition(",")[2] if image_text.startswith("data:") else image_text
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            if image.width * image.height > caps.max_input_pixels:
                raise FieldError("image", f"is {image.width}x{image.height}: over this server's cap of "
                                          f"{caps.max_input_pixels} pixels per uploaded image")
            chunks = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
            if image.format == "PNG":
                chunks |= image.text
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise FieldError("image", f"does not decode to an image ({type(e).__name__}): send a PNG, "
                                  f"base64-encoded") from None
    geninfo = chunks.pop("parameters", "")
    parameters = {}
    try:
        parsed = parse_parameters(geninfo) if geninfo else None
    except InputError:  # not A1111's text (a JSON document): the text is still returned as info
        parsed = None
    if parsed is not None:
        parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.params}
        width, _, height = parsed.params.get("Size", "").partition("x")
        if height:
            parameters |= {"Size-1": width, "Size-2": height}
    return {"info": geninfo, "items": chunks, "parameters": parameters}
