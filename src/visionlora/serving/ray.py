"""The server on Ray Serve: replicas of ``visionlora serve`` over a folder of runs, each model's
requests routed to a replica that holds it.

    visionlora serve --ray --runs-dir DIR [--replicas N] [--replica-cpus C] [--replica-gpus G]
    serve run visionlora.serving.ray:app runs_dir=DIR replicas=2           # Ray's own command

A ``Gateway`` deployment takes every HTTP request. For ``/v1/models/{name}/...`` it calls the
``Replica`` deployment with ``name`` as the multiplexed model id, so Ray routes it to a replica
that already holds that run; other paths go to any replica. Each replica is the single-machine
server (its FastAPI app, ModelStore, mixed-adapter batcher and metrics) with runs loaded on
demand and at most ``max_loaded`` held, the same bound Ray's per-replica LRU of model ids uses.
The answers, bad-request answers and Prometheus names are those of ``visionlora serve``;
``/metrics`` gives the metrics of the replica that answers, beside Ray's own. The API key
(``api_key``, or the ``VISIONLORA_API_KEY`` variable where the application is built) guards
every route as it does there: each replica checks the header the gateway passes on.

Run folders must be on storage every node of the cluster sees, at the same path.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from visionlora.errors import VisionLoraError
from visionlora.ray_cluster import join_cluster
from visionlora.serving import API_KEY_VARIABLE, DEFAULT_MAX_LOADED

if TYPE_CHECKING:
    from visionlora.serving.app import ServeSettings

GATEWAY_MAX_ONGOING = 10_000
MODEL_PATH = re.compile(r"^/(?:v1/models/([^/]+)/(?:predict|draw)|hf/models/([^/]+)|predictions/([^/]+))$")


@dataclass
class RaySettings:
    """What ``visionlora serve --ray`` (or ``serve run ... key=value``) sets."""

    runs_dir: str
    max_loaded: int = DEFAULT_MAX_LOADED
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # requests a replica takes at once; more wait in Ray's router. None: 4 batches' worth, so the batcher fills
    max_ongoing_requests: int | None = None
    autoscaling: dict[str, Any] | None = None  # Ray's autoscaling_config, passed through (replaces replicas)
    serve: dict[str, Any] = field(default_factory=dict)  # ServeSettings fields: max_batch_size, max_wait_ms, ...

    @classmethod
    def from_args(cls, args: dict[str, str]) -> RaySettings:
        """From ``serve run`` arguments (all strings); the ServeSettings fields are taken by name."""
        import json

        from visionlora.serving.app import ServeSettings

        own = set(cls.__dataclass_fields__) - {"autoscaling", "serve"}
        serve_fields = set(ServeSettings.__dataclass_fields__)
        unknown = set(args) - own - serve_fields - {"autoscaling"}
        if unknown or "runs_dir" not in args:
            takes = ", ".join(sorted(own - {"runs_dir"}))
            raise ValueError(f"visionlora.serving.ray:app takes runs_dir=DIR and {takes}, autoscaling (JSON), "
                             f"{', '.join(sorted(serve_fields))}; got {', '.join(sorted(args))}")
        settings = cls(**{k: _typed(cls, k, v) for k, v in args.items() if k in own},
                       autoscaling=json.loads(args["autoscaling"]) if "autoscaling" in args else None,
                       serve={k: _typed(ServeSettings, k, v) for k, v in args.items() if k in serve_fields})
        settings.runs_dir = str(Path(settings.runs_dir).resolve())  # replicas may run in another folder
        if not settings.serve.get("api_key") and os.environ.get(API_KEY_VARIABLE):
            settings.serve["api_key"] = os.environ[API_KEY_VARIABLE]  # as visionlora serve takes it
        return settings


@serve.deployment
class Replica:
    """One ``visionlora serve``: a ModelStore over the runs folder behind the same FastAPI app."""

    def __init__(self, settings: dict[str, Any]):
        import httpx

        from visionlora.serving.app import ServeSettings, VisionServer
        from visionlora.serving.models import ModelStore, device_for_gpus

        config = RaySettings(**settings)
        self.store = ModelStore(device_for_gpus(config.replica_gpus), config.runs_dir, config.max_loaded,
                                precision=config.serve.get("precision", "fp32"),
                                compile=config.serve.get("compile", False))
        self.server = VisionServer(self.store, ServeSettings(**config.serve), identity={"replica_pid": os.getpid()})
        self.server.start()  # an ASGI transport runs no lifespan: the replica starts and stops the server
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.server.app()),
                                        base_url="http://replica", timeout=None)

        async def model_id(name: str) -> str:
            """Ray's record that this replica serves ``name`` (the store loads and unloads the run itself)."""
            return name

        self.get_model = serve.multiplexed(max_num_models_per_replica=config.max_loaded)(model_id)

    def __del__(self) -> None:
        """Ray Serve's shutdown of the replica: the server's batchers and thread pools stopped."""
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                     body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        model = serve.get_multiplexed_model_id()
        if model:
            await self.get_model(model)
        answer = await self.client.request(method, path + ("?" + query.decode() if query else ""),
                                           headers=headers, content=body)
        return answer.status_code, list(answer.headers.items()), answer.content


@serve.deployment
class Gateway:
    """The HTTP entry: each model request goes to a replica holding that model."""

    def __init__(self, replicas):
        self.replicas = replicas

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        match = MODEL_PATH.match(path)
        model = next((name for name in match.groups() if name), None) if match else None
        handle = self.replicas.options(multiplexed_model_id=model) if model else self.replicas
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        status, answer_headers, body = await handle.handle.remote(request.method, path, request.url.query.encode(),
                                                                  headers, await request.body())
        kept = {k: v for k, v in answer_headers if k.lower() not in ("content-length", "transfer-encoding")}
        return Response(body, status_code=status, headers=kept)


def build(settings: RaySettings):
    """The Serve application: the gateway in front of the replicas."""
    from visionlora.serving.app import ServeSettings

    batch = settings.serve.get("max_batch_size", ServeSettings.max_batch_size)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": settings.replica_cpus,
                                                     "num_gpus": settings.replica_gpus},
                               "max_ongoing_requests": settings.max_ongoing_requests or 4 * batch}
    if settings.autoscaling:
        options["autoscaling_config"] = settings.autoscaling
    else:
        options["num_replicas"] = settings.replicas
    # @serve.deployment makes each class a Deployment, which mypy does not see through a class decorator
    replicas = Replica.options(**options).bind(asdict(settings))  # type: ignore[attr-defined]
    # the gateway only forwards, so it never holds requests back: Ray's router queues them for the replicas
    return Gateway.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=GATEWAY_MAX_ONGOING).bind(replicas)


def app(args: dict[str, str]):
    """``serve run visionlora.serving.ray:app runs_dir=DIR [replicas=N ...]``."""
    return build(RaySettings.from_args(args))


def run_on_ray(settings: RaySettings, host: str, port: int, address: str | None = None) -> None:
    """Deploy on the Ray cluster at ``address`` (none: a local one, stopped on exit) and serve until
    SIGTERM or Ctrl-C, then take the application down."""
    import signal
    import threading

    import ray

    join_cluster(address, _cpus_needed(settings))
    stop = threading.Event()
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings), name="visionlora", route_prefix="/")
        for signum in (signal.SIGTERM, signal.SIGINT):  # after Ray's own handlers are in place
            signal.signal(signum, lambda *_: stop.set())
        print(f"listening on http://{host}:{port} (Ray Serve: {_replica_text(settings)}, runs in "
              f"{settings.runs_dir}, at most {settings.max_loaded} loaded per replica)", flush=True)
        while not stop.wait(timeout=0.5):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


def command_settings(runs_dir: str | None, run_folders: Sequence[str], serve_settings: ServeSettings, *,
                     max_loaded: int, replicas: int, replica_cpus: float, replica_gpus: float,
                     max_ongoing_requests: int | None, autoscaling: str | None) -> RaySettings:
    """The settings of ``visionlora serve --ray``, checked with a one-line error naming the flag.

    Ray Serve serves ``runs_dir`` only: run folders named one by one and an admin token are
    refused. ``autoscaling`` is the JSON text of Ray Serve's autoscaling_config.
    """
    if run_folders or not runs_dir:
        raise VisionLoraError("--ray serves --runs-dir DIR (on storage every node sees), not run folders named "
                              "one by one")
    if not Path(runs_dir).is_dir():
        raise VisionLoraError(f"{runs_dir}: no such folder of runs")
    if serve_settings.admin_token:
        raise VisionLoraError("--admin-token is not taken with --ray: add runs to --runs-dir instead")
    scaling = autoscaling_config(autoscaling) if autoscaling else None
    if min(replicas, max_loaded, max_ongoing_requests or 1) < 1:
        raise VisionLoraError("--replicas, --max-loaded-adapters and --max-ongoing-requests must be at least 1")
    return RaySettings(str(Path(runs_dir).resolve()), max_loaded, replicas, replica_cpus, replica_gpus,
                       max_ongoing_requests, scaling, asdict(serve_settings))


def autoscaling_config(text: str) -> dict[str, Any]:
    """``--autoscaling`` checked by Ray Serve's own AutoscalingConfig, so a typo is one line."""
    import json

    from ray.serve.config import AutoscalingConfig

    try:
        config = json.loads(text)
    except ValueError as err:
        raise VisionLoraError(f"--autoscaling: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise VisionLoraError("--autoscaling: a JSON object of Ray Serve's autoscaling_config fields")
    unknown = set(config) - set(AutoscalingConfig.model_fields)
    if unknown:
        raise VisionLoraError(f"--autoscaling: {', '.join(sorted(unknown))} is not a field of Ray Serve's "
                              f"autoscaling_config ({', '.join(sorted(AutoscalingConfig.model_fields))})")
    try:
        AutoscalingConfig(**config)
    except ValueError as err:  # pydantic's ValidationError
        message = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        raise VisionLoraError(f"--autoscaling: {message}") from None
    return config


def _cpus_needed(settings: RaySettings) -> float:
    """The CPUs the replicas hold at once (at the autoscaling minimum when it scales)."""
    count = settings.replicas
    if settings.autoscaling:
        count = settings.autoscaling.get("min_replicas", settings.autoscaling.get("initial_replicas", 1)) or 1
    return count * settings.replica_cpus


def _replica_text(settings: RaySettings) -> str:
    count = f"autoscaling {settings.autoscaling}" if settings.autoscaling else f"{settings.replicas} replica(s)"
    return f"{count}, {settings.replica_cpus:g} CPU and {settings.replica_gpus:g} GPU each"


def _typed(settings_class, name: str, text: str):
    kind = settings_class.__dataclass_fields__[name].type
    if "bool" in str(kind):
        return text.lower() in ("1", "true", "yes")
    if "int" in str(kind):
        return int(text)
    if "float" in str(kind):
        return float(text)
    return text
