"""The HTTP server: FastAPI endpoints over a :class:`ModelStore`, with batching and metrics.

    GET  /                             a page to try the models
    GET  /health
    GET  /v1/models                    served runs (loaded or loadable from --runs-dir), which mix
    POST /v1/models/{name}/predict     multipart ``file`` (one or more) and the task's options; a
                                       top-down task's box options name a served model finding its
                                       boxes (pose: ``detector``, ``detector_threshold``, ...)
    POST /v1/models/{name}/draw        the first image with its prediction drawn, as PNG
    GET  /metrics                      Prometheus text
    POST /v1/models, DELETE /v1/models/{name}   load / unload runs (with --admin-token)

Every bad request gets a 4xx answer with ``{"error": "..."}``. A run under ``--runs-dir`` loads on
its first request; the batcher of a base's mixing LoRA adapters lets requests for different
adapters share one forward.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from visionlora.core.outputs import per_image_values, png_bytes
from visionlora.data.images import UnreadableImage, load_rgb
from visionlora.errors import VisionLoraError
from visionlora.serving.batching import Batcher, Job
from visionlora.serving.models import ModelStore, ServedModel, StoreEvents, UnknownModel, predict_together


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    admin_token: str | None = None
    precision: str = "fp32"
    mixed_batches: bool = True  # requests for different LoRA adapters of one base share forwards

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


DRAIN_FACTOR = 4  # a refused upload is read (and dropped) up to this many times the limit


class ApiError(Exception):
    """A bad request: its status code and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Metrics(StoreEvents):
    """Prometheus counters and histograms of one server, counting its store's loads and unloads too."""

    def __init__(self, store: ModelStore):
        self.registry = CollectorRegistry()
        self.requests = Counter("visionlora_requests", "HTTP requests", ["endpoint", "model", "status"],
                                registry=self.registry)
        self.latency = Histogram("visionlora_request_seconds", "request latency", ["endpoint"], registry=self.registry)
        self.batch_size = Histogram("visionlora_batch_images", "images per model forward", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.images = Counter("visionlora_images", "images predicted", ["model"], registry=self.registry)
        self.forward_images = Histogram("visionlora_forward_images",
                                        "images per forward, by how many adapters it mixed", ["adapters"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        Gauge("visionlora_loaded_adapters", "runs loaded now (an adapter each; a full run counts as one)",
              registry=self.registry).set_function(lambda: len(store.models))
        self.loads = Counter("visionlora_adapter_loads", "runs loaded on demand", registry=self.registry)
        self.evictions = Counter("visionlora_adapter_evictions", "runs unloaded to stay within --max-loaded-adapters",
                                 registry=self.registry)
        self.load_seconds = Histogram("visionlora_adapter_load_seconds", "time to load a run on its first request",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                      registry=self.registry)

    def loaded(self, name: str, seconds: float) -> None:
        self.loads.inc()
        self.load_seconds.observe(seconds)

    def evicted(self, name: str) -> None:
        self.evictions.inc()

    def forward(self, models: list[ServedModel]) -> None:
        self.forward_images.labels(str(len(set(map(id, models))))).observe(len(models))
        for name in {served.name for served in models}:
            self.batch_size.labels(name).observe(len(models))


def create_app(store: ModelStore, settings: ServeSettings, identity: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI application serving ``store``; ``identity`` is added to ``/health`` (e.g. a replica's pid)."""
    app = FastAPI(title="visionlora", docs_url=None, redoc_url=None)
    metrics = Metrics(store)
    store.events = metrics
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="visionlora-forward")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visionlora-load")
    batchers: dict[tuple, Batcher] = {}
    loading: dict[str, asyncio.Future] = {}

    def forward(images, models, **options):
        return predict_together(models, images, settings.precision, **options)

    def batcher_for(served: ServedModel) -> Batcher:
        group = served.batch_group(settings.mixed_batches)
        if group not in batchers:
            batchers[group] = Batcher(forward, executor, settings.max_batch_size, settings.max_wait_ms,
                                      on_batch=metrics.forward)
        return batchers[group]

    async def hold(name: str) -> ServedModel:
        """The run ``name``, loaded on first need and counted in flight (release it after use)."""
        for _ in range(3):  # a run unloaded between its load and this request's hold is loaded again
            served = store.acquire(name)
            if served is not None:
                return served
            pending = loading.get(name)
            if pending is None:  # this request loads it, and the load holds it for this request
                pending = loading[name] = asyncio.get_running_loop().run_in_executor(loader, store.load, name)
                pending.add_done_callback(lambda _: loading.pop(name, None))
                return await loaded(name, pending)
            await loaded(name, pending, hold=False)
        raise ApiError(503, f"model {name!r} is being unloaded and loaded again under load; try again")

    async def loaded(name: str, pending: asyncio.Future, hold: bool = True) -> ServedModel | None:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:  # the client went away: the hold taken for it ends with the load
            if hold:
                pending.add_done_callback(lambda done: done.exception() or store.release(done.result()))
            raise
        except UnknownModel as err:
            served = ", ".join(sorted(store.models)) or "none loaded"
            raise ApiError(404, f"{err} (served: {served})") from None
        except VisionLoraError as err:
            raise ApiError(500, str(err)) from None

    def let_go(served: ServedModel) -> None:
        """The end of a hold; runs beyond the bound (all in flight when others loaded) are unloaded now."""
        if store.release(served):
            asyncio.get_running_loop().run_in_executor(loader, store.unload_beyond_bound)

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
        return {"status": "ok", "models": len(store.models), **(identity or {})}

    @app.get("/v1/models")
    async def list_models():
        return {"models": await _in_thread(loader, store.catalogue) if store.runs_dir else store.catalogue()}

    async def run_prediction(name: str, request: Request):
        served = await hold(name)
        try:
            form = await read_form(request, settings.max_upload_bytes)
            names, images = await read_images(form)
            options, per_image, box_values = parse_options(served, form, names)
            options.update(await found_boxes(served, box_values, images, options))
            predictions = await predicted(served, Job(images, options, per_image, served))
        finally:
            let_go(served)
        metrics.images.labels(name).inc(len(images))
        return served, names, images, predictions

    async def predicted(served: ServedModel, job: Job) -> list[dict]:
        try:
            return await batcher_for(served).submit(job)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None

    async def found_boxes(served: ServedModel, box_values: dict[str, Any], images: list,
                          options: dict[str, Any]) -> dict[str, Any]:
        """Top-down: the boxes a served model of another task finds, as the task's predict option."""
        try:
            request = served.task.prediction.box_request(box_values)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        if request is None:
            return {}
        box_model = await hold(request.model)
        try:
            request.refuse_given_boxes(options)
            request.check(box_model.info, box_model.name)
            found = await predicted(box_model, Job(images, request.model_options(), (), box_model))
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        finally:
            let_go(box_model)
        return {request.option: request.keep(found)}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request):
        _, names, _, predictions = await run_prediction(name, request)
        return {"predictions": [{"image": n, **p} for n, p in zip(names, predictions)]}

    @app.post("/v1/models/{name}/draw")
    async def draw(name: str, request: Request):
        served, names, images, predictions = await run_prediction(name, request)
        drawn = served.task.prediction.draw(images[0], predictions[0], served.info)
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
            served = await _in_thread(loader, store.add, body["name"], body["path"])
        except VisionLoraError as err:
            raise ApiError(409 if "already served" in str(err) else 400, str(err)) from None
        return JSONResponse(served.describe(), status_code=201)

    @app.delete("/v1/models/{name}")
    async def unload_model(name: str, request: Request):
        check_admin(request)
        try:
            await _in_thread(loader, store.remove, name)
        except KeyError:
            raise ApiError(404, f"no model named {name!r} is loaded") from None
        return {"unloaded": name}

    return app


async def _in_thread(executor, function, *args):
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
