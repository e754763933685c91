"""The Prometheus metrics of one server: requests, latency, batches, images and its store's loads."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from visionlora.serving.models import ModelStore, ServedModel, StoreEvents

REFUSAL_CAUSES = ("queue_full", "timeout", "unauthorized", "bad_body")


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
        self.failures = Counter("visionlora_failures", "requests the server could not serve, by model and cause",
                                ["model", "cause"], registry=self.registry)
        self.refusals = Counter("visionlora_refusals", "requests refused instead of answered, by cause (queue_full: "
                                "503, timeout: 504, unauthorized: 401, bad_body: a refused image or body, 4xx)",
                                ["cause"], registry=self.registry)
        for cause in REFUSAL_CAUSES:
            self.refusals.labels(cause)  # each cause shown from the start, at 0
        self.dropped = Counter("visionlora_dropped_images", "images dropped from a batcher before their forward, "
                               "their request past its deadline", registry=self.registry)
        self.splits = Counter("visionlora_forward_splits",
                              "forwards that ran out of accelerator memory and were retried in halves",
                              registry=self.registry)
        self.forward_images = Histogram("visionlora_forward_images",
                                        "images per forward, by how many adapters it mixed", ["adapters"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        Gauge("visionlora_loaded_adapters", "runs loaded now (an adapter each; a full run counts as one)",
              registry=self.registry).set_function(lambda: len(store.models))
        self.registry.register(ModelPrecisions(store))
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

    def split(self, models: list[ServedModel]) -> None:
        self.splits.inc()

    def forward(self, models: list[ServedModel]) -> None:
        self.forward_images.labels(str(len(set(map(id, models))))).observe(len(models))
        for name in {served.name for served in models}:
            self.batch_size.labels(name).observe(len(models))


class ModelPrecisions(Collector):
    """The precision each loaded model runs in (1 on its label), and the warm-up of compiled ones."""

    def __init__(self, store: ModelStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        precision = GaugeMetricFamily("visionlora_model_precision", "the precision each loaded model runs in "
                                      "(fp32, bf16, or int8 for a quantized ONNX export): 1 on its label",
                                      labels=["model", "precision"])
        warmup = GaugeMetricFamily("visionlora_compile_warmup_seconds", "the torch.compile warm-up of each "
                                   "compiled model (serve --compile)", labels=["model"])
        for served in list(self.store.models.values()):
            precision.add_metric([served.name, served.base.precision.name if served.base.precision else "fp32"], 1)
            if served.base.compile_seconds is not None:
                warmup.add_metric([served.name], served.base.compile_seconds)
        yield precision
        yield warmup
