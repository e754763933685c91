"""The HTTP server: FastAPI endpoints over a :class:`ModelStore`, with batching and metrics.

    GET  /                             a page to try the models
    GET  /health
    GET  /v1/models
    POST /v1/models/{name}/predict     multipart ``file`` (one or more) and the task's options; a
                                       top-down task's box options name a served model finding its
                                       boxes (pose: ``detector``, ``detector_threshold``, ...)
    POST /v1/models/{name}/draw        the first image with its prediction drawn, as PNG
    GET  /metrics                      Prometheus text
    POST /v1/models, DELETE /v1/models/{name}   load / unload runs (with --admin-token)

Every bad request gets a 4xx answer with ``{"error": "..."}``.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.deploy.outputs import per_image_values, png_bytes
from visionlora.errors import VisionLoraError
from visionlora.serving.batching import Batcher, Job
from visionlora.serving.models import ModelStore, ServedModel


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    admin_token: str | None = None
    precision: str = "fp32"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


DRAIN_FACTOR = 4  # a refused upload is read (and dropped) up to this many times the limit


class ApiError(Exception):
    """A bad request: its status code and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Metrics:
    """Prometheus counters and histograms of one server."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("visionlora_requests", "HTTP requests", ["endpoint", "model", "status"],
                                registry=self.registry)
        self.latency = Histogram("visionlora_request_seconds", "request latency", ["endpoint"], registry=self.registry)
        self.batch_size = Histogram("visionlora_batch_images", "images per model forward", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.images = Counter("visionlora_images", "images predicted", ["model"], registry=self.registry)


def create_app(store: ModelStore, settings: ServeSettings) -> FastAPI:
    """The FastAPI application serving ``store``."""
    app = FastAPI(title="visionlora", docs_url=None, redoc_url=None)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="visionlora-forward")
    batchers: dict[str, Batcher] = {}

    def batcher_for(served: ServedModel) -> Batcher:
        if served.name not in batchers:
            batchers[served.name] = Batcher(
                lambda images, **options: served.predict(images, settings.precision, **options), executor,
                settings.max_batch_size, settings.max_wait_ms,
                on_batch=lambda n: metrics.batch_size.labels(served.name).observe(n))
        return batchers[served.name]

    def lookup(name: str) -> ServedModel:
        served = store.models.get(name)
        if served is None:
            raise ApiError(404, f"no model named {name!r} (served: {', '.join(sorted(store.models)) or 'none'})")
        return served

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse({"error": f"bad request: {err.errors()[0].get('msg', 'invalid')}"}, status_code=400)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        parts = request.url.path.strip("/").split("/")
        model = parts[2] if len(parts) >= 3 and parts[:2] == ["v1", "models"] else ""
        endpoint = parts[3] if len(parts) == 4 and model else request.url.path
        metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("visionlora.serving").joinpath("page.html").read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(store.models)}

    @app.get("/v1/models")
    async def list_models():
        return {"models": [served.describe() for served in store.models.values()]}

    async def run_prediction(name: str, request: Request):
        served = lookup(name)
        form = await read_form(request, settings.max_upload_bytes)
        names, images = await read_images(form)
        options, per_image, box_values = parse_options(served, form, names)
        options.update(await found_boxes(served, box_values, images, options))
        job = Job(images, options, per_image)
        try:
            predictions = await batcher_for(served).submit(job)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        metrics.images.labels(name).inc(len(images))
        return served, names, images, predictions

    async def found_boxes(served: ServedModel, box_values: dict[str, Any], images: list,
                          options: dict[str, Any]) -> dict[str, Any]:
        """Top-down: the boxes a served model of another task finds, as the task's predict option."""
        try:
            request = served.task.box_request(box_values)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        if request is None:
            return {}
        box_model = lookup(request.model)
        try:
            request.refuse_given_boxes(options)
            request.check(box_model.info, box_model.name)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        found = await batcher_for(box_model).submit(Job(images, request.model_options(), ()))
        return {request.option: request.keep(found)}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request):
        _, names, _, predictions = await run_prediction(name, request)
        return {"predictions": [{"image": n, **p} for n, p in zip(names, predictions)]}

    @app.post("/v1/models/{name}/draw")
    async def draw(name: str, request: Request):
        served, names, images, predictions = await run_prediction(name, request)
        drawn = served.task.draw(images[0], predictions[0], served.info)
        return Response(png_bytes(drawn), media_type="image/png")

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def check_admin(request: Request) -> None:
        if not settings.admin_token:
            raise ApiError(403, "admin endpoints are off; start the server with --admin-token")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode()):
            raise ApiError(401, "admin calls need the header 'Authorization: Bearer <token>'")

    @app.post("/v1/models")
    async def load_model(request: Request):
        check_admin(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, 'expected a JSON body {"name": ..., "path": ...}') from None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise ApiError(400, 'expected a JSON body {"name": ..., "path": ...}')
        try:
            served = await _in_thread(executor, store.add, body["name"], body["path"])
        except VisionLoraError as err:
            raise ApiError(409 if "already served" in str(err) else 400, str(err)) from None
        return JSONResponse(served.describe(), status_code=201)

    @app.delete("/v1/models/{name}")
    async def unload_model(name: str, request: Request):
        check_admin(request)
        lookup(name)
        await _in_thread(executor, store.remove, name)
        batcher = batchers.pop(name, None)
        if batcher is not None:
            await batcher.close()
        return {"unloaded": name}

    return app


async def _in_thread(executor, function, *args):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(executor, function, *args)


async def read_form(request: Request, max_bytes: int) -> FormData:
    """The multipart form of ``request``, refusing bodies over ``max_bytes`` (413) and malformed ones."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "expected a multipart/form-data upload with a 'file' field")
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the upload is larger than the server's limit of {max_bytes / 1024 / 1024:g} MB")
    stream = request.stream()
    if length.isdigit() and int(length) > max_bytes:
        await _drain(stream, DRAIN_FACTOR * max_bytes)
        raise too_large

    async def limited():
        total = 0
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                raise too_large
            yield chunk

    try:
        return await MultiPartParser(request.headers, limited(), max_part_size=max_bytes).parse()
    except MultiPartException as err:
        raise ApiError(400, f"malformed multipart body: {err.message}") from None
    except ApiError:
        await _drain(stream, DRAIN_FACTOR * max_bytes)
        raise


async def _drain(stream, limit: int) -> None:
    """Read and drop up to ``limit`` more bytes of a refused body, so the client (still sending)
    receives the answer instead of a reset connection; past that the connection is closed."""
    dropped = 0
    try:
        async for chunk in stream:
            dropped += len(chunk)
            if dropped > limit:
                break
    except Exception:  # the client went away: nothing to answer
        pass


async def read_images(form: FormData) -> tuple[list[str], list[Any]]:
    """The uploaded ``file`` fields, decoded; an unreadable one is a 400 naming it."""
    uploads = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
    if not uploads:
        raise ApiError(400, "no 'file' field: upload one or more images as multipart field 'file'")
    names, images = [], []
    for index, upload in enumerate(uploads):
        name = upload.filename or f"file{index + 1}"
        try:
            images.append(load_rgb(await upload.read()))
        except UnreadableImage as err:
            raise ApiError(400, f"file {name!r}: {err}") from None
        names.append(name)
    return names, images


def parse_options(served: ServedModel, form: FormData,
                  names: list[str]) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """(the task's predict options, the per-image ones among them, its box options' values) from the
    form fields; unknown fields and bad values are a 400."""
    task = served.task
    known = {option.name: option for option in (*task.predict_options, *task.box_options)}
    unknown = sorted(key for key in form.keys() if key != "file" and key not in known)
    if unknown:
        takes = ", ".join(known) or "none"
        raise ApiError(400, f"{task.name} models take no option {unknown[0]!r} (options: {takes})")
    options: dict[str, Any] = {}
    per_image = []
    for name, option in known.items():
        text = form.get(name)
        if text is None or isinstance(text, UploadFile):
            continue
        try:
            value = option.parse_field(text)
        except VisionLoraError as err:
            raise ApiError(400, f"option {name!r}: {err}") from None
        if option.per_image:
            value = per_image_values(value, names) if isinstance(value, dict) else [value] * len(names)
            per_image.append(name)
        options[name] = value
    for name in [o.name for o in task.predict_options if o.per_image and o.name not in options]:
        options[name] = [None] * len(names)
        per_image.append(name)
    box_values = {option.name: options.pop(option.name, None) for option in task.box_options}
    return options, tuple(per_image), box_values
