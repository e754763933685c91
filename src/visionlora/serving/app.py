"""The HTTP server: FastAPI endpoints over a :class:`ModelStore`, with batching and metrics.

    GET  /                             a page to try the models
    GET  /health, /v2/health/live      liveness (open without the API key)
    GET  /v2/health/ready              200 once the runs named at start are loaded, else 503
    GET  /v2/models/{name}/ready       200 when ``name`` is loaded, else 503 (404 when unknown)
    GET  /v1/models                    served runs (loaded or loadable from --runs-dir), which mix
    POST /v1/models/{name}/predict     the images (multipart ``file`` fields, a raw image body or
                                       base64 JSON: see :mod:`forms`) and the task's options; a
                                       top-down task's box options name a served model finding its
                                       boxes (pose: ``detector``, ``detector_threshold``, ...)
    POST /v1/models/{name}/draw        the first image with its prediction drawn, as PNG
    POST /hf/models/{name}             Hugging Face Inference API shapes (see :mod:`shapes`)
    POST /predictions/{name}           TorchServe's route: the first image's prediction
    GET  /metrics                      Prometheus text
    POST /v1/models, DELETE /v1/models/{name}   load / unload runs (with --admin-token)

With an API key, every route but liveness (and ``/metrics`` with ``public_metrics``) needs
``Authorization: Bearer KEY``; the admin routes take their own token instead. Prediction
requests beyond ``max_queue`` held at once are answered 503 with ``Retry-After`` at once, and
one past ``timeout_s`` is answered 504 (its images are dropped from the batcher if their forward
has not started, or at once if it would end past the deadline); ``visionlora_refusals_total``
counts both, refused keys and refused bodies, by cause.

Every bad request gets a 4xx answer with ``{"error": "..."}``. A request the accelerator has no
memory for (an image that does not fit even alone in a forward, or a run that does not fit when
loaded) gets a 503 with ``Retry-After``, counted in ``visionlora_failures`` by cause; the server
keeps serving. A run under ``--runs-dir`` loads on its first request; the batcher of a base's
mixing LoRA adapters lets requests for different adapters share one forward.

A :class:`VisionServer` holds the store, a batcher per batch group and three thread pools (forwards,
loads, and the preparing of requests' images); its app's lifespan starts the pools, and at shutdown
stops the batchers and the pools. A request's images are decoded, resized and normalised in the
preparing pool, off the event loop and alongside the forward of the batch before: a forward thread
only stacks prepared pixels, runs the model and decodes its outputs.
When the store unloads a run, the batcher that served only that run is dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from visionlora.core.outputs import png_bytes
from visionlora.deploy.prediction import PREPARED, prepared_inputs
from visionlora.errors import VisionLoraError
from visionlora.serving import DEFAULT_MAX_PIXELS
from visionlora.serving.batching import Batcher, BatcherStopped, DeadlineMissed, Job
from visionlora.serving.forms import ApiError, Upload, decoded_images, parse_options, read_upload
from visionlora.serving.memory import RETRY_AFTER_S, OutOfMemory
from visionlora.serving.metrics import Metrics
from visionlora.serving.models import ModelStore, ServedModel, StoreEvents, UnknownModel, predict_together

FORWARD_THREADS = 2  # forwards of different bases run at once; one base's forwards take turns on its lock
PREPARE_THREADS = 2  # requests' images decoded, resized and normalised at once, beside the forwards
LIVENESS = ("/health", "/v2/health/live")  # open without the API key: a process that answers is alive
QUEUE_RETRY_AFTER_S = 1  # the Retry-After of a request refused because --max-queue requests are held


@dataclass(frozen=True)
class ServeSettings:
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    admin_token: str | None = field(default=None, repr=False)
    precision: str = "fp32"  # requested (fp32, bf16 or auto): the store puts each model in it at load
    mixed_batches: bool = True  # requests for different LoRA adapters of one base share forwards
    api_key: str | None = field(default=None, repr=False)  # Bearer key of every route but liveness
    public_metrics: bool = False  # /metrics open without the API key
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_queue: int | None = None  # prediction requests held at once (reading, waiting, in a forward)
    timeout_s: float | None = None  # a prediction request's deadline from its arrival
    compile: bool = False  # torch.compile each served model at load

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class VisionServer(StoreEvents):
    """The runs of ``store`` served over HTTP: a batcher per batch group (a run alone, or the mixing
    adapters of one base), a pool of forward threads, one load thread, and metrics.

    :meth:`app` is its FastAPI application, whose lifespan runs :meth:`start` and :meth:`stop` (where no
    lifespan runs, e.g. an app mounted in another, the pools start on the first request). The
    server takes the store's events: it counts loads and evictions, and drops the batcher that served
    only a run the store unloads. ``identity`` is added to ``/health`` (e.g. a replica's pid).
    """

    def __init__(self, store: ModelStore, settings: ServeSettings, identity: dict[str, Any] | None = None,
                 preload: Sequence[tuple[str, str]] = (), announce: Callable[[ServedModel], None] | None = None):
        self.store, self.settings, self.identity = store, settings, dict(identity or {})
        self.metrics = Metrics(store)
        self.batchers: dict[tuple, Batcher] = {}
        self.forward_pool: ThreadPoolExecutor | None = None
        self.load_pool: ThreadPoolExecutor | None = None
        self.prepare_pool: ThreadPoolExecutor | None = None
        self._batchers_lock = threading.Lock()  # the store drops batchers from its load thread
        self._pools_lock = threading.Lock()
        self._dropped: weakref.WeakSet[Batcher] = weakref.WeakSet()  # dropped ones still answering
        self._loading: dict[str, asyncio.Future] = {}
        self.preload, self.announce = list(preload), announce
        self.waiting_for = {name for name, _ in self.preload}  # runs named at start, not loaded yet
        self.preload_error: str | None = None
        self.held = 0  # prediction requests held now (for --max-queue)
        store.events = self

    # -- lifespan ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread pools (nothing when they run); the first start loads the runs named at start
        in the load thread, while the server already answers (not ready until they are loaded)."""
        with self._pools_lock:
            if self.forward_pool is None or self.load_pool is None or self.prepare_pool is None:
                self.forward_pool = ThreadPoolExecutor(FORWARD_THREADS, thread_name_prefix="visionlora-forward")
                self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="visionlora-load")
                self.prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="visionlora-prepare")
                preload, self.preload = self.preload, []
                if preload:
                    self.load_pool.submit(self._load_at_start, preload)

    def _load_at_start(self, runs: list[tuple[str, str]]) -> None:
        """Load ``runs`` (name, folder), each announced once loaded; a failure is kept (ready stays false)
        and printed as one line."""
        for name, folder in runs:
            try:
                served = self.store.add(name, folder)
            except Exception as err:  # the server keeps answering, and says why it is not ready
                self.preload_error = f"model {name!r} ({folder}) could not be loaded: {err}"
                print(f"error: {self.preload_error}", file=sys.stderr, flush=True)
                return
            self.waiting_for.discard(name)
            if self.announce is not None:
                self.announce(served)

    @property
    def ready(self) -> bool:
        """Whether every run named at start is loaded."""
        return not self.waiting_for and self.preload_error is None

    def stop(self) -> None:
        """Stop every batcher (requests still waiting in one fail) and shut the pools down once the
        forwards and loads they run have ended; nothing when stopped."""
        with self._batchers_lock:
            batchers, self.batchers = list(self.batchers.values()) + list(self._dropped), {}
            self._dropped.clear()
        for batcher in batchers:
            batcher.stop()
        pools = [pool for pool in (self.forward_pool, self.load_pool, self.prepare_pool) if pool is not None]
        self.forward_pool = self.load_pool = self.prepare_pool = None
        for pool in pools:
            pool.shutdown(wait=True)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: the server runs between its startup and its shutdown."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def _forward_threads(self) -> ThreadPoolExecutor:
        self.start()
        assert self.forward_pool is not None
        return self.forward_pool

    def _load_thread(self) -> ThreadPoolExecutor:
        self.start()
        assert self.load_pool is not None
        return self.load_pool

    async def _in_load_thread(self, function: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._load_thread(), function, *args)

    async def _in_prepare_thread(self, function: Callable, *args: Any) -> Any:
        self.start()
        assert self.prepare_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, function, *args)

    # -- store events ------------------------------------------------------------------------------
    def loaded(self, name: str, seconds: float) -> None:
        self.metrics.loaded(name, seconds)

    def evicted(self, name: str) -> None:
        self.metrics.evicted(name)

    def unloaded(self, served: ServedModel) -> None:
        """Drop the batcher of ``served``'s group when the group was only it (a run alone, or the last
        run of its base); one still answering requests ends when its queue is empty."""
        group = served.batch_group(self.settings.mixed_batches)
        if group == ("run", served.name) or not served.base.adapters:
            with self._batchers_lock:
                dropped = self.batchers.pop(group, None)
                if dropped is not None:  # it answers what it holds; the server's stop stops it too
                    self._dropped.add(dropped)

    # -- holding runs and batching their requests -----------------------------------------------------
    def batcher_for(self, served: ServedModel) -> Batcher:
        """The batcher of ``served``'s batch group, made on first need."""
        group = served.batch_group(self.settings.mixed_batches)
        with self._batchers_lock:
            if group not in self.batchers:
                self.batchers[group] = Batcher(self._forward, self._forward_threads(),
                                               self.settings.max_batch_size, self.settings.max_wait_ms,
                                               on_batch=self.metrics.forward, on_split=self.metrics.split,
                                               on_drop=self.metrics.dropped.inc)
            return self.batchers[group]

    def _forward(self, images: list, models: list[ServedModel], **options: Any) -> list[dict]:
        return predict_together(models, images, **options)

    async def hold(self, name: str) -> ServedModel:
        """The run ``name``, loaded on first need and counted in flight (:meth:`let_go` it after use)."""
        for _ in range(3):  # a run unloaded between its load and this request's hold is loaded again
            served = self.store.acquire(name)
            if served is not None:
                return served
            if name in self.waiting_for:
                if self.preload_error:
                    raise ApiError(503, f"model {name!r} is not loaded: {self.preload_error}")
                raise ApiError(503, f"model {name!r} is still loading; try again", {"Retry-After": "1"})
            pending = self._loading.get(name)
            if pending is None:  # this request loads it, and the load holds it for this request
                pool = self._load_thread()
                pending = self._loading[name] = asyncio.get_running_loop().run_in_executor(pool, self.store.load, name)
                pending.add_done_callback(lambda _: self._loading.pop(name, None))
                return await self._awaited_load(name, pending)
            await self._awaited_load(name, pending, hold=False)
        raise ApiError(503, f"model {name!r} is being unloaded and loaded again under load; try again")

    async def _awaited_load(self, name: str, pending: asyncio.Future, hold: bool = True) -> ServedModel:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:  # the client went away: the hold taken for it ends with the load
            if hold:
                pending.add_done_callback(lambda done: done.exception() or self.store.release(done.result()))
            raise
        except UnknownModel as err:
            served = ", ".join(sorted(self.store.models)) or "none loaded"
            raise ApiError(404, f"{err} (served: {served})") from None
        except OutOfMemory as err:
            raise self._out_of_memory(name, "load_out_of_memory", err) from None
        except VisionLoraError as err:
            raise ApiError(500, str(err)) from None

    def let_go(self, served: ServedModel) -> None:
        """The end of a hold; runs beyond the bound (all in flight when others loaded) are unloaded now."""
        if self.store.release(served) and self.load_pool is not None:
            asyncio.get_running_loop().run_in_executor(self.load_pool, self.store.unload_beyond_bound)

    async def predicted(self, served: ServedModel, job: Job) -> list[dict]:
        """``job``'s predictions, from the batcher of ``served``."""
        try:
            return await self.batcher_for(served).submit(job)
        except BatcherStopped as err:
            raise ApiError(503, str(err)) from None
        except DeadlineMissed as err:
            raise self._timed_out(str(err)) from None
        except OutOfMemory as err:
            raise self._out_of_memory(served.name, "forward_out_of_memory", err) from None
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None

    def _out_of_memory(self, name: str, cause: str, err: OutOfMemory) -> ApiError:
        """The 503 answer to a request the accelerator had no memory for, counted by cause."""
        self.metrics.failures.labels(name, cause).inc()
        return ApiError(503, f"model {name!r}: {err}", {"Retry-After": str(RETRY_AFTER_S)})

    async def found_boxes(self, served: ServedModel, box_values: dict[str, Any], images: list,
                          options: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """Top-down: the boxes a served model of another task finds, as the task's predict option."""
        try:
            request = served.task.prediction.box_request(box_values)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        if request is None:
            return {}
        box_model = await self.hold(request.model)
        try:
            request.refuse_given_boxes(options)
            request.check(box_model.info, box_model.name)
            job = await self._prepared_job(box_model, images, request.model_options(), (), deadline)
            found = await self.predicted(box_model, job)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        finally:
            self.let_go(box_model)
        return request.options(found)

    async def run_prediction(self, name: str, request: Request) -> tuple[ServedModel, list[str], list, list[dict]]:
        """(the run, the image names, the images, their predictions) of a predict or draw request, held
        within ``max_queue`` and answered within ``timeout_s``."""
        with self._admitted():
            return await self._within_deadline(self._prediction(name, request))

    async def _prediction(self, name: str, request: Request) -> tuple[ServedModel, list[str], list, list[dict]]:
        seconds = self.settings.timeout_s
        deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
        served = await self.hold(name)
        try:
            upload = await self._upload(request)
            options, per_image, box_values = parse_options(served, upload.fields, upload.names)
            images = await self._decoded(upload)
            found = await self.found_boxes(served, box_values, images, options, deadline)  # per image
            options.update(found)
            per_image = (*per_image, *(name for name in found if name not in per_image))
            predictions = await self.predicted(served, await self._prepared_job(served, images, options, per_image,
                                                                                deadline))
        finally:
            self.let_go(served)
        self.metrics.images.labels(name).inc(len(images))
        return served, upload.names, images, predictions

    async def _upload(self, request: Request) -> Upload:
        """The request's image bytes and fields; a refused body is counted (cause ``bad_body``)."""
        try:
            return await read_upload(request, self.settings.max_upload_bytes)
        except ApiError:
            self.metrics.refusals.labels("bad_body").inc()
            raise

    async def _decoded(self, upload: Upload) -> list:
        """The upload's images, decoded in a preparing thread; a refused image is counted (cause ``bad_body``)."""
        try:
            return await self._in_prepare_thread(decoded_images, upload, self.settings.max_pixels)
        except ApiError:
            self.metrics.refusals.labels("bad_body").inc()
            raise

    async def _prepared_job(self, served: ServedModel, images: list, options: dict[str, Any],
                            per_image: tuple[str, ...], deadline: float | None) -> Job:
        """The job of ``images`` for ``served``, their model inputs made in a preparing thread (a bad option
        found there is a 400)."""
        try:
            prepared = await self._in_prepare_thread(_prepared, served, images, options)
        except VisionLoraError as err:
            raise ApiError(400, str(err)) from None
        return Job(images, {**options, PREPARED: prepared}, (*per_image, PREPARED), served, deadline)

    def _admitted(self) -> _Held:
        """The request held while it runs; past ``max_queue`` held at once, a 503 with Retry-After now."""
        limit = self.settings.max_queue
        if limit is not None and self.held >= limit:
            self.metrics.refusals.labels("queue_full").inc()
            raise ApiError(503, f"the server holds {limit} requests already (--max-queue); try again",
                           {"Retry-After": str(QUEUE_RETRY_AFTER_S)})
        return _Held(self)

    async def _within_deadline(self, work: Awaitable[Any]) -> Any:
        """``work``'s result, or a 504 past ``timeout_s`` (``work`` is cancelled: images still waiting in a
        batcher are dropped; a forward already started ends, and its answer is thrown away)."""
        seconds = self.settings.timeout_s
        if seconds is None:
            return await work
        try:
            return await asyncio.wait_for(work, seconds)
        except TimeoutError:
            raise self._timed_out("") from None

    def _timed_out(self, why: str) -> ApiError:
        """The 504 answer to a request past (or bound to pass) its deadline, counted."""
        self.metrics.refusals.labels("timeout").inc()
        return ApiError(504, f"no answer within the server's deadline of {self.settings.timeout_s:g} s (--timeout-s)"
                        + (f": {why}" if why else ""))

    # -- routes ---------------------------------------------------------------------------------------
    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("visionlora.serving").joinpath("page.html").read_text())

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": len(self.store.models), **self.identity}

    async def live(self) -> dict[str, bool]:
        return {"live": True}

    async def ready_answer(self) -> JSONResponse:
        """OIP v2 server readiness: 200 once the runs named at start are loaded, else 503 saying why."""
        body: dict[str, Any] = {"ready": self.ready}
        if self.waiting_for:
            body["loading"] = sorted(self.waiting_for)
        if self.preload_error:
            body["error"] = self.preload_error
        return JSONResponse(body, status_code=200 if self.ready else 503)

    async def model_ready(self, name: str) -> JSONResponse:
        """OIP v2 model readiness: 200 for a loaded run, or one under --runs-dir (it loads on its first
        request); 503 for a run named at start not loaded yet; 404 for an unknown name."""
        loaded = name in self.store.models
        if not loaded and name not in self.waiting_for:
            try:
                self.store.run_under_dir(name)
            except UnknownModel as err:
                raise ApiError(404, str(err)) from None
        ready = name not in self.waiting_for
        return JSONResponse({"name": name, "ready": ready, "loaded": loaded}, status_code=200 if ready else 503)

    async def list_models(self) -> dict[str, Any]:
        store = self.store
        return {"models": await self._in_load_thread(store.catalogue) if store.runs_dir else store.catalogue()}

    async def predict(self, name: str, request: Request) -> JSONResponse:
        _, names, _, predictions = await self.run_prediction(name, request)  # JSON-ready: no encoder walk
        return JSONResponse({"predictions": [{"image": n, **p} for n, p in zip(names, predictions)]})

    async def draw(self, name: str, request: Request) -> Response:
        served, names, images, predictions = await self.run_prediction(name, request)
        drawn = served.task.prediction.draw(images[0], predictions[0], served.info)
        return Response(png_bytes(drawn), media_type="image/png")

    async def hugging_face(self, name: str, request: Request) -> JSONResponse:
        """Hugging Face's Inference API: an answer per image (a list of them for several images)."""
        served, _, _, predictions = await self.run_prediction(name, request)
        answers = [served.task.prediction.hugging_face_answer(p, served.info) for p in predictions]
        return JSONResponse(answers[0] if len(answers) == 1 else answers)

    async def torchserve(self, name: str, request: Request) -> dict[str, Any]:
        """TorchServe's ``/predictions/{name}``: the first image's prediction, as ``visionlora predict`` gives it."""
        _, _, _, predictions = await self.run_prediction(name, request)
        return predictions[0]

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def load_model(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        name, path = await _name_and_path(request)
        try:
            served = await self._in_load_thread(self.store.add, name, path)
        except OutOfMemory as err:
            raise self._out_of_memory(name, "load_out_of_memory", err) from None
        except VisionLoraError as err:
            raise ApiError(409 if "already served" in str(err) else 400, str(err)) from None
        return JSONResponse(served.describe(), status_code=201)

    async def unload_model(self, name: str, request: Request) -> dict[str, str]:
        self._check_admin(request)
        try:
            await self._in_load_thread(self.store.remove, name)
        except KeyError:
            raise ApiError(404, f"no model named {name!r} is loaded") from None
        return {"unloaded": name}

    def _check_admin(self, request: Request) -> None:
        token = self.settings.admin_token
        if not token:
            raise ApiError(403, "admin endpoints are off; start the server with --admin-token")
        if not _bearer_is(request, token):
            raise ApiError(401, "admin calls need the header 'Authorization: Bearer <token>'")

    def _open_route(self, request: Request) -> bool:
        """Whether ``request`` goes without the API key: liveness, the admin routes (their own token) and,
        with ``public_metrics``, /metrics."""
        path, method = request.url.path, request.method
        admin = (method == "POST" and path == "/v1/models") or (method == "DELETE" and path.count("/") == 3
                                                                and path.startswith("/v1/models/"))
        return path in LIVENESS or admin or (path == "/metrics" and self.settings.public_metrics)

    async def guard(self, request: Request, call_next: Callable) -> Response:
        """Middleware: with an API key, a request without ``Authorization: Bearer KEY`` (compared in constant
        time) is answered 401, unless its route is open."""
        key = self.settings.api_key
        if key and not self._open_route(request) and not _bearer_is(request, key):
            self.metrics.refusals.labels("unauthorized").inc()
            return JSONResponse({"error": "this server needs the header 'Authorization: Bearer <API key>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    async def count(self, request: Request, call_next: Callable) -> Response:
        """Middleware: each request counted by endpoint (a route's path, or the last part of a
        /v1/models/{name}/... one), model and status, and its latency observed."""
        started = time.perf_counter()
        response = await call_next(request)
        path, model = _route_of(request)
        endpoint = path.rsplit("/", 1)[1] if path.startswith("/v1/models/{name}/") else path
        self.metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    def routes(self) -> list[tuple[str, str, Callable]]:
        """(method, path, endpoint) of every route."""
        return [("GET", "/", self.page), ("GET", "/health", self.health), ("GET", "/v1/models", self.list_models),
                ("POST", "/v1/models/{name}/predict", self.predict), ("POST", "/v1/models/{name}/draw", self.draw),
                ("POST", "/hf/models/{name}", self.hugging_face), ("POST", "/predictions/{name}", self.torchserve),
                ("GET", "/v2/health/live", self.live), ("GET", "/v2/health/ready", self.ready_answer),
                ("GET", "/v2/models/{name}/ready", self.model_ready),
                ("GET", "/metrics", self.prometheus), ("POST", "/v1/models", self.load_model),
                ("DELETE", "/v1/models/{name}", self.unload_model)]

    def app(self) -> FastAPI:
        """The FastAPI application of this server (``app.state.server`` is this server)."""
        app = FastAPI(title="visionlora", docs_url=None, redoc_url=None, lifespan=self.lifespan)
        app.state.server = self
        # Starlette types a handler as taking any Exception, though it calls it only with the class it is added for
        app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _unexpected_error)
        app.middleware("http")(self.guard)
        app.middleware("http")(self.count)  # added last, so outermost: refused keys are counted too
        for method, path, endpoint in self.routes():
            app.add_api_route(path, endpoint, methods=[method], response_model=None)
        return app


def create_app(store: ModelStore, settings: ServeSettings, identity: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI application serving ``store``; ``identity`` is added to ``/health`` (e.g. a replica's pid)."""
    return VisionServer(store, settings, identity).app()


class _Held:
    """A prediction request counted in ``server.held`` while it runs."""

    def __init__(self, server: VisionServer):
        self.server = server

    def __enter__(self) -> None:
        self.server.held += 1

    def __exit__(self, *exc: object) -> None:
        self.server.held -= 1


def _prepared(served: ServedModel, images: list, options: dict[str, Any]) -> list:
    """Each image's model inputs for ``served``, as its forward would make them."""
    return prepared_inputs(served.task, images, [served.view] * len(images), **options)


def _bearer_is(request: Request, secret: str) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer SECRET``, compared in constant time."""
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())


def _route_of(request: Request) -> tuple[str, str]:
    """(the path of the route ``request`` matched, or "unmatched"; its ``name`` parameter, or "")."""
    for route in request.app.router.routes:
        match, child = route.matches(request.scope)
        if match != Match.NONE:
            return getattr(route, "path", "unmatched"), str(child.get("path_params", {}).get("name", ""))
    return "unmatched", ""


async def _name_and_path(request: Request) -> tuple[str, str]:
    """The ``name`` and ``path`` of an admin load's JSON body."""
    expected = ApiError(400, 'expected a JSON body {"name": ..., "path": ...}')
    try:
        body = await request.json()
    except ValueError:
        raise expected from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
        raise expected
    return body["name"], body["path"]


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)


async def _unexpected_error(request: Request, err: Exception) -> JSONResponse:
    """Any other failure: still one JSON line, and the server goes on."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return JSONResponse({"error": f"unexpected {type(err).__name__}: {first_line}"}, status_code=500)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"bad request: {err.errors()[0].get('msg', 'invalid')}"}, status_code=400)
