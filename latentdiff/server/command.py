"""`latentdiff serve`'s flags and start-up: checks, security rules (loopback by default, auth or an explicit
flag for any other address), then uvicorn. FastAPI and uvicorn are imported only when serving."""

import ipaddress
import logging
import os
from pathlib import Path

from ..errors import InputError

log = logging.getLogger("latentdiff.server")


def add_serve_flags(p) -> None:
    from .schema import Caps
    caps = Caps()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; another needs --api-auth or --insecure-listen)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860, as A1111)")
    p.add_argument("--model-dir", metavar="DIR", help="folder of checkpoints clients may switch between "
                                                      "(sd_model_checkpoint); default: only --model")
    p.add_argument("-o", "--outdir", default="outputs", help="where save_images writes; files are never "
                                                             "overwritten (default: outputs)")
    p.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="HTTP basic authentication, as A1111's")
    p.add_argument("--insecure-listen", action="store_true",
                   help="allow a --host other than loopback without --api-auth (anyone who can reach it can use it)")
    p.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN]",
                   help="let web pages from these origins call the API (default: none; CORS off)")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond the running one; past it: "
                                                              "503 with Retry-After (default: 16)")
    p.add_argument("--max-steps", type=int, default=caps.max_steps,
                   help=f"sampling steps of a request (default: {caps.max_steps})")
    p.add_argument("--max-pixels", type=int, default=caps.max_pixels,
                   help=f"width x height of a generated image (default: {caps.max_pixels})")
    p.add_argument("--max-images", type=int, default=caps.max_images,
                   help=f"batch_size x n_iter of a request (default: {caps.max_images})")
    p.add_argument("--max-body-mb", type=float, default=32, help="request body size (default: 32)")
    p.add_argument("--threads", type=int, help="CPU threads per generation (default: as many as there are idle "
                                               "cores when it starts)")


def parse_auth(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    users = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise InputError(f"--api-auth: {pair.strip()!r} is not USER:PASS; give USER:PASS[,USER2:PASS2]")
        users[user] = password
    return users


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args) -> int:
    from .schema import Caps
    users = parse_auth(args.api_auth)
    if not is_loopback(args.host) and not users:
        if not args.insecure_listen:
            raise InputError(f"--host {args.host} would let anyone who reaches it generate without a password: "
                             f"add --api-auth USER:PASS, or --insecure-listen to allow it anyway")
        log.warning("warning: listening on %s without --api-auth: anyone who can reach it can use it", args.host)
    for name in ("port", "queue_size", "max_steps", "max_pixels", "max_images"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    from ..resources import demo_model
    model = Path(args.model).expanduser() if args.model else demo_model()
    if not model.exists():
        raise InputError(f"model not found: {args.model} (pass --model PATH)")
    outdir = Path(args.outdir).expanduser().absolute()
    existing = next(p for p in (outdir, *outdir.parents) if p.exists())  # save_images creates the rest
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"-o/--outdir {args.outdir}: {existing} is not a writable folder; choose another")
    model_dir = Path(args.model_dir).expanduser() if args.model_dir else None
    if model_dir is not None and not model_dir.is_dir():
        raise InputError(f"--model-dir {args.model_dir}: no such folder")
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        raise InputError(f"the server needs FastAPI and uvicorn ({e}): pip install 'latentdiff[serve]'") from None
    options = dict(device=args.device, dtype=args.dtype, threads=args.threads, config=args.config,
                   prediction=args.prediction, vae=args.vae, loras=[(Path(p).expanduser(), w) for p, w in args.lora],
                   embeddings_dir=args.embeddings_dir and Path(args.embeddings_dir).expanduser())
    origins = tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip())
    config = ServerConfig(model=model, model_dir=model_dir, outdir=outdir,
                          caps=Caps(max_steps=args.max_steps, max_pixels=args.max_pixels, max_images=args.max_images),
                          max_body_bytes=int(args.max_body_mb * 2**20), queue_size=args.queue_size,
                          api_auth=users, pipeline_options=options, cors_origins=origins)
    app = create_app(config)
    print(f"latentdiff serve: http://{args.host}:{args.port}/ (API at /sdapi/v1; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


class Background:
    """A server running in a thread of this process (tests, notebooks, the load benchmark): `url` is its
    address (a free loopback port by default); `stop()` shuts it down and stops its worker."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import threading
        import time

        import uvicorn
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="latentdiff-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
