"""The HTTP API: a FastAPI app around one Pipeline and its `Batcher`.

    POST /v1/images   JSON request -> JSON {"images": [base64 PNG], "seed", "timings"}, or the PNG
                      itself for one image when the request says `Accept: image/png`
    GET  /healthz     the process answers
    GET  /readyz      the model is loaded and warmed (503 until then)
    GET  /metrics     Prometheus: queue depth, batch sizes, per-stage latency, rejections
    GET  /docs        OpenAPI docs from the request schema

The model is chosen when the app is made (`Settings`), never by a request. Every accepted
request is answered once: images, 422 (a field out of range, named), 503 + Retry-After (queue
full, or not ready yet), 504 (deadline), 500 (the backend failed its batch; the server goes on).
A client that disconnects while queued frees its place.
"""


import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from fastdiff.serve.batcher import Batch, Batcher, DeadlineExceeded, QueueFull, Ticket, solo_key

log = logging.getLogger("fastdiff.serve")

STAGES = ("queue_wait", "text_encoder", "vae_encode", "denoise", "vae_decode", "request")


@dataclass(frozen=True)
class Settings:
    """What a server runs and its limits; read once at start (`python -m fastdiff.serve` flags,
    or a Ray Serve config's `args`)."""

    model: str | None = None  # a name or folder (None: $FASTDIFF_MODEL, else the embedded model)
    backend: str = "auto"
    device: str | None = None
    dtype: str | None = None
    api_key: str | None = None  # required in X-API-Key (or Authorization: Bearer) when set
    max_batch_images: int = 8  # rows per denoising loop; 1 turns batching off
    max_queue: int = 64  # queued requests before 503
    max_wait_ms: float = 10.0  # how long the oldest queued request waits for others to join
    max_pixels: int = 768 * 768  # height x width of one image
    max_steps: int = 100
    max_images_per_request: int = 4
    max_prompt_chars: int = 2000
    max_guidance: float = 50.0  # beyond it one request's NaNs would fail its whole batch
    timeout_s: float = 300.0  # a request's deadline unless it asks for less
    retry_after_s: int = 2
    max_body_bytes: int = 16 * 2**20  # a request's JSON (base64 images included); larger: 413
    warmup: bool = True  # one small generation before /readyz says ready

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown server settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
        return cls(**values)


class Metrics:
    """The Prometheus series, in a registry of this app's own (several apps per process in tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("fastdiff_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.batch_images = Histogram("fastdiff_batch_images", "images per denoising loop", registry=self.registry,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))  # fmt: skip
        self.stage_seconds = Histogram("fastdiff_stage_seconds", "seconds per stage of a request", ["stage"],
                                       registry=self.registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.requests = Counter("fastdiff_requests", "answered requests by HTTP status", ["status"], registry=self.registry)
        self.rejected = Counter("fastdiff_rejected", "requests not run, by reason", ["reason"], registry=self.registry)

    def batch(self, batch: Batch) -> None:
        self.batch_images.observe(batch.images)
        for stage in ("text_encoder", "vae_encode", "denoise", "vae_decode"):
            if stage in batch.timings:
                self.stage_seconds.labels(stage).observe(batch.timings[stage])


def _request_model(settings: Settings):
    """The request schema (pydantic), its static ranges; the server's caps are checked per request."""
    from pydantic import BaseModel, ConfigDict, Field

    from fastdiff.pipeline import SCHEDULER_NAMES

    class ImageRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(min_length=1, description=f"at most {settings.max_prompt_chars} characters")
        negative_prompt: str | None = None
        steps: int = Field(25, ge=1, le=settings.max_steps)
        guidance_scale: float = Field(7.5, ge=0, le=settings.max_guidance, description="<= 1 turns guidance off")
        height: int | None = Field(None, ge=8, description="px, a multiple of the model's size step; default the model's")
        width: int | None = Field(None, ge=8)
        seed: int | None = Field(None, ge=0, lt=2**63, description="None: the server draws one and returns it")
        scheduler: str = Field("dpmpp_2m", description=", ".join(SCHEDULER_NAMES))
        num_images: int = Field(1, ge=1, le=settings.max_images_per_request)
        image: str | None = Field(None, description="img2img / inpainting: a base64 PNG or JPEG")
        mask_image: str | None = Field(None, description="inpainting: a base64 image, white repaints")
        strength: float | None = Field(None, gt=0, le=1)
        timeout_s: float | None = Field(None, gt=0, le=settings.timeout_s, description="deadline for this request")

    return ImageRequest


def field_of(message: str, fields) -> str:
    """The request field a fastdiff ValueError names (its messages start with the argument)."""
    m = re.match(r"--?(\w+)|(\w+)", message)
    name = (m.group(1) or m.group(2)) if m else ""
    name = {"mask": "mask_image"}.get(name, name)
    return name if name in fields else "body"


def unprocessable(field: str, message: str) -> dict:
    """A 422 body in FastAPI's own shape, naming `field`."""
    loc = ["body"] if field == "body" else ["body", field]
    return {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}


def _decode_image(field: str, data: str | None, max_pixels: int):
    """A base64 image, its size checked against `max_pixels` before its pixels are decoded."""
    if data is None:
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=("PNG", "JPEG"))
    except Exception as e:  # noqa: BLE001 - any undecodable input is the client's error, named
        raise ValueError(f"{field}: not a base64-encoded PNG or JPEG ({type(e).__name__})") from None
    if image.width * image.height > max_pixels:
        raise ValueError(f"{field}: {image.width}x{image.height} px is over this server's limit of {max_pixels} pixels per image")
    try:
        image.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{field}: a damaged image ({type(e).__name__}: {e})") from None
    return image


def png(image_array) -> bytes:
    """float32 [H, W, 3] in [0, 1] -> PNG bytes (rounded as to_pil rounds)."""
    from fastdiff.pipeline import to_pil

    buf = io.BytesIO()
    to_pil(image_array[None])[0].save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """The loaded pipeline, its batcher and metrics; the app's routes call into it."""

    def __init__(self, settings: Settings, pipe=None, load_now: bool = False):
        self.settings, self.metrics = settings, Metrics()
        self.pipe, self.batcher, self.error = None, None, None
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = threading.Event()
        if pipe is not None:
            self._start(pipe)
        elif load_now:  # a replica that cannot load fails to start, and Ray says so, rather than answering 503 forever
            self._load()
            if self.error is not None:
                raise self.error
        else:
            threading.Thread(target=self._load, name="fastdiff-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from fastdiff.pipeline import Pipeline

            s = self.settings
            pipe = Pipeline.from_pretrained(s.model, backend=s.backend, device=s.device, dtype=s.dtype)
            self._start(pipe)
        except Exception as e:  # noqa: BLE001 - reported by /readyz and every request
            log.exception("fastdiff.serve: loading the model failed")
            self.error = e

    def _start(self, pipe) -> None:
        s = self.settings
        if s.warmup:  # the first call pays one-time costs (allocations, oneDNN primitives, graph capture)
            pipe.generate("warm up", steps=2, seed=0, output_type="np")
        self.pipe = pipe
        self.batcher = Batcher(pipe, max_images=s.max_batch_images, max_queue=s.max_queue, max_wait_s=s.max_wait_ms / 1000,
                               pad=pipe.device.type == "cuda" and pipe.cuda_graph and pipe.backend.capturable,
                               on_batch=self.metrics.batch)  # fmt: skip
        self.ready.set()
        log.info("fastdiff.serve: ready (%s on %s, backend %s)", pipe.facts.model_name, pipe.device, pipe.backend.name)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    def authorized(self, headers) -> bool:
        key = self.settings.api_key
        if not key:
            return True
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), key.encode())

    def ticket(self, req) -> Ticket:
        """The request checked against the server's caps and the model's rules (ValueError naming
        the field) and made a Ticket; nothing is queued yet."""
        from fastdiff.pipeline import Job, check_args, check_request, read_edit

        s, pipe = self.settings, self.pipe
        for name in ("prompt", "negative_prompt"):
            text = getattr(req, name)
            if text is not None and len(text) > s.max_prompt_chars:
                raise ValueError(f"{name}: {len(text)} characters, over the limit of {s.max_prompt_chars}")
        seed = req.seed if req.seed is not None else secrets.randbelow(2**63)
        check_args(req.prompt, req.negative_prompt, req.steps, req.guidance_scale, req.height, req.width, req.scheduler,
                   req.num_images, "np", seed, pipe.limits)  # fmt: skip
        image, mask = (_decode_image(f, getattr(req, f), s.max_pixels) for f in ("image", "mask_image"))
        edit = read_edit(pipe.facts, image, mask, req.strength, req.height, req.width, pipe.backend, pipe.limits)
        height, width, _ = check_request(pipe.facts, pipe.limits, req.steps, req.height, req.width, req.scheduler,
                                         req.num_images, pipe.backend, "cpu", edit)  # fmt: skip
        if height * width > s.max_pixels:
            name = "image" if edit is not None and req.height is None else "height"
            raise ValueError(f"{name}: {width}x{height} px is over this server's limit of {s.max_pixels} pixels per image")
        deadline = time.monotonic() + (req.timeout_s or s.timeout_s)
        if edit is not None:  # runs alone, through Pipeline.run with the decoded images
            solo = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
                        guidance_scale=req.guidance_scale, height=req.height, width=req.width, seed=seed,
                        scheduler=req.scheduler, num_images=req.num_images, image=image, mask_image=mask,
                        strength=req.strength)  # fmt: skip
            return Ticket(solo_key(), req.num_images, deadline, solo=solo)
        job = Job(req.prompt, req.negative_prompt, seed, req.guidance_scale, req.num_images)
        key = (height, width, req.steps, req.scheduler, req.guidance_scale > 1.0)
        return Ticket(key, req.num_images, deadline, job=job)


class TooLarge(BaseException):
    """Raised from `Gate`'s receive past the body limit; a BaseException so that FastAPI's body
    parsing (which turns an Exception into a 400) lets it through to the Gate that answers 413."""


class Gate:
    """ASGI middleware in front of the app, before any body is read: the API key (`authorized`)
    for every path but /healthz and /readyz, and the body size, by Content-Length and by counting
    what arrives (a chunked body has no Content-Length). (Plain ASGI: Starlette's
    BaseHTTPMiddleware would change how the endpoint sees a client's disconnect.)"""

    OPEN = ("/healthz", "/readyz")

    def __init__(self, app, limit: int, authorized, refuse):
        self.app, self.limit, self.authorized, self.refuse = app, limit, authorized, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] not in self.OPEN and not self.authorized(headers):
            return await self.refuse(401, "missing or wrong API key (X-API-Key header)", "unauthorized")(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await self.refuse(413, f"the request body is over {self.limit} bytes", "too_large")(scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except TooLarge:
            if not started:
                await self.refuse(413, f"the request body is over {self.limit} bytes", "too_large")(scope, receive, send)


def create_app(settings: Settings | None = None, pipe=None, load_now: bool = False):
    """The FastAPI app for `settings`: serving `pipe` if given, else loading the model, in the
    background (/readyz says when it is ready) or, with `load_now`, before returning."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool

    settings = settings or Settings()
    ImageRequest = _request_model(settings)
    server = Server(settings, pipe, load_now)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.close)

    app = FastAPI(title="fastdiff", version="1", lifespan=lifespan,
                  description="Text to image, img2img and inpainting with one model, batched.")  # fmt: skip
    app.state.server = server

    def answer(status: int, body: dict, headers: dict | None = None, reason: str | None = None):
        """Every counted answer: its status, and the reason when the request was not run."""
        server.metrics.requests.labels(str(status)).inc()
        if reason:
            server.metrics.rejected.labels(reason).inc()
        return JSONResponse(body, status_code=status, headers={"X-Fastdiff-Replica": server.replica, **(headers or {})})

    app.add_middleware(Gate, limit=settings.max_body_bytes, authorized=server.authorized,
                       refuse=lambda status, detail, reason: answer(status, {"detail": detail}, reason=reason))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """FastAPI's 422, without echoing the input back (a NaN in it would not render as JSON)."""
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return answer(422, {"detail": errors}, reason="invalid")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if server.error is not None:
            return JSONResponse({"ready": False, "error": str(server.error)}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        pipe = server.pipe
        import torch

        return {"ready": True, "model": pipe.facts.model_name, "backend": pipe.backend.name, "device": str(pipe.device),
                "replica": server.replica, "cpu_threads": torch.get_num_threads()}  # fmt: skip

    @app.get("/metrics")
    def metrics():
        if server.batcher is not None:
            server.metrics.queue_depth.set(server.batcher.depth())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images", responses={200: {"content": {"image/png": {}}}})
    async def images(req: ImageRequest, request: Request):
        t0 = time.monotonic()  # the API key and the body size were checked by Gate
        if server.error is not None:
            return answer(503, {"detail": f"the model failed to load: {server.error}"}, reason="not_ready")
        if not server.ready.is_set():
            return answer(503, {"detail": "the model is still loading"}, {"Retry-After": str(settings.retry_after_s)}, "not_ready")
        try:
            ticket = await run_in_threadpool(server.ticket, req)  # decodes images: off the event loop
        except ValueError as e:
            return answer(422, unprocessable(field_of(str(e), ImageRequest.model_fields), str(e)), reason="invalid")
        try:
            future = server.batcher.submit(ticket)
        except QueueFull as e:
            return answer(503, {"detail": f"busy: {e}"}, {"Retry-After": str(settings.retry_after_s)}, "queue_full")
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if done:
                break
            if await request.is_disconnected():
                future.cancel()  # only while queued: a running batch finishes for the others
                return answer(499, {"detail": "client disconnected"}, reason="disconnected")
            if time.monotonic() > ticket.deadline:
                future.cancel()
                return answer(504, {"detail": "deadline passed before the images were made"}, reason="deadline")
        if waiting.cancelled():
            return answer(503, {"detail": "the server is shutting down"}, reason="shutdown")
        error = waiting.exception()
        if isinstance(error, DeadlineExceeded):
            return answer(504, {"detail": str(error)}, reason="deadline")
        if error is not None:
            return answer(500, {"detail": f"the backend failed this batch: {type(error).__name__}: {error}"}, reason="backend_error")
        result = waiting.result()
        server.metrics.stage_seconds.labels("queue_wait").observe(max(0.0, time.monotonic() - ticket.queued_at
                                                                      - result.timings.get("end_to_end", 0.0)))  # fmt: skip
        pngs = await run_in_threadpool(lambda: [png(im) for im in result.images])
        server.metrics.stage_seconds.labels("request").observe(time.monotonic() - t0)
        seed = ticket.job.seed if ticket.job is not None else ticket.solo["seed"]
        headers = {"X-Fastdiff-Replica": server.replica, "X-Seed": str(seed)}
        server.metrics.requests.labels("200").inc()
        if len(pngs) == 1 and "image/png" in request.headers.get("accept", ""):
            return Response(pngs[0], media_type="image/png", headers=headers)
        timings = {k: round(v, 4) for k, v in result.timings.items()}
        body = {"images": [base64.b64encode(p).decode() for p in pngs], "seed": seed, "timings": timings,
                "batch_images": ticket.batch_images}  # fmt: skip
        return JSONResponse(body, headers=headers)

    return app
