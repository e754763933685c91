"""The runs a server holds: each distinct base model once, every LoRA run an adapter on it.

A LoRA run's base is keyed by its task, the revision of its weights recorded at training (else
its resolved location), its head size and the adapter's peft type, so a changed base is never
silently shared and adapters of other peft types get a base copy of their own (peft cannot
hold two types in one model). Full-mode runs are models of their own. Forwards on one base are
serialised by that base's lock, so requests never see another adapter's weights.

Runs named at start (or loaded by an admin call) stay loaded. Runs under ``runs_dir`` are
loaded on their first request, one load at a time, and the least recently used of them is
unloaded when more than ``max_loaded`` runs are held, never while one of its requests is in
flight. A load that runs out of accelerator memory fails with :class:`OutOfMemory`, its cache freed.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from visionlora.artifacts import RunPaths, folder_bytes
from visionlora.deploy.precision import FP32, Precision, cast_to_bf16, check_images, choose_precision, settle_precision
from visionlora.deploy.prediction import PredictView, predict, predict_mixed
from visionlora.deploy.runs import RunFolder, load_model, open_run
from visionlora.errors import VisionLoraError
from visionlora.modeling.loading import base_revision, check_weight_files, loading_policy
from visionlora.modeling.mixed_batches import mixing_refusal, prepare_mixed_batches
from visionlora.runtime import pick_device
from visionlora.serving import DEFAULT_MAX_LOADED
from visionlora.serving.compiling import compile_served
from visionlora.serving.memory import OutOfMemory, free_cached_memory
from visionlora.serving.slots import AdapterSlots
from visionlora.tasks.base import ModelInfo, Task

if TYPE_CHECKING:
    from visionlora.deploy.onnx_model import OnnxAdapters


class UnknownModel(VisionLoraError):
    """No model of that name is served or can be loaded."""


@dataclass
class SharedBase:
    """One model in memory (a base with adapters, or a full model) and the lock around its forwards."""

    key: tuple
    model: Any  # a peft or transformers model, or an ONNX model called alike (deploy.onnx_model)
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: set[str] = field(default_factory=set)  # the names of the runs on it
    slots: AdapterSlots | OnnxAdapters = field(default_factory=AdapterSlots)
    weights: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # the base's own, by name (before peft)
    precision: Precision | None = None  # settled with the first run loaded on it (None until then)
    compile_seconds: float | None = None  # the warm-up of a torch.compile'd model (None: not compiled)


@dataclass(eq=False)
class ServedModel:
    """A run as the server offers it."""

    name: str
    paths: RunPaths
    task: Task
    info: ModelInfo
    processor: Any
    base: SharedBase
    adapter_bytes: int
    adapter: str | None  # the base's adapter slot holding this run (None for a full model)
    refuses_mixing: str | None  # why its requests cannot share a forward with other adapters' (None: they can)
    pinned: bool = False  # named at start or by an admin call: never unloaded to make room
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0

    def __post_init__(self):
        # views with equal keys preprocess alike (input size, normalisation) and so stack in one forward
        batch_key = repr((self.processor.to_dict(), sorted(self.info.forward_kwargs.items())))
        # and with equal descriptions (labels, the task's facts) they decode alike
        self.view = PredictView(self.adapter, self.processor, self.info, batch_key,
                                repr((batch_key, self.info.to_dict())))

    def batch_group(self, mixing: bool) -> tuple:
        """Runs with the same group share batches: mixing LoRA adapters of one base, else each run alone."""
        if mixing and self.refuses_mixing is None:
            return ("base",) + self.base.key
        return ("run", self.name)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "loaded": True,
            "task": self.task.name,
            "mode": self.info.mode,
            "base_model": self.info.base_model,
            "labels": self.info.labels,
            "adapter_bytes": self.adapter_bytes,
            "shares_base_with": sorted(self.base.adapters - {self.name}),
            "mixes": self.refuses_mixing is None,
            "mixing": self.refuses_mixing or "shares forwards with the other mixing adapters of its base",
            "pinned": self.pinned,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used)),
            "options": [o.name for o in self.task.predict_options],
            **(self.base.precision or FP32).describe(),
            "compiled": self.base.compile_seconds is not None,
            "compile_warmup_s": self.base.compile_seconds,
        }

    def predict(self, images, **options: Any) -> list[dict]:
        """The task's predictions with this run's weights active, in its base's precision (thread-safe)."""
        with self.base.lock:
            if self.adapter is not None and self.base.model.active_adapter != self.adapter:
                self.base.model.set_adapter(self.adapter)  # walks the whole model: only when another was active
            return predict(self.task, self.base.model, self.processor, images, self.info, **options)


def predict_together(members: Sequence[ServedModel], images, **options: Any) -> list[dict]:
    """Each image predicted by its own run: one run as usual, several adapters of one base in mixed forwards.

    A batch of one run whose adapter is not the active one, on a base that mixes, runs as a mixed batch
    of that one adapter (peft's own computation of one adapter, on every row): no walk over the model
    to make it active, which grows with the adapters the base holds.
    """
    first = members[0]
    if all(member is first for member in members) and (
            first.refuses_mixing is not None or first.base.model.active_adapter == first.adapter):
        return first.predict(images, **options)
    with first.base.lock:
        return predict_mixed(first.task, first.base.model, images, [member.view for member in members], **options)


class StoreEvents:
    """What a store reports as it loads and unloads runs (the server counts them and lets go of what
    served an unloaded run)."""

    def loaded(self, name: str, seconds: float) -> None:
        """``name`` was loaded on its first request, in ``seconds``."""

    def evicted(self, name: str) -> None:
        """``name`` was unloaded to stay within ``max_loaded`` (:meth:`unloaded` follows)."""

    def unloaded(self, served: ServedModel) -> None:
        """``served`` is no longer served (evicted or removed); its base is freed when it held no other run."""


class ModelStore:
    """Named runs, loading each base once; safe to change while serving."""

    def __init__(self, device: str | None = None, runs_dir: str | Path | None = None,
                 max_loaded: int = DEFAULT_MAX_LOADED, events: StoreEvents | None = None,
                 precision: str = "fp32", compile: bool = False):
        self.device = str(pick_device(device or "auto"))
        choose_precision(precision, torch.device(self.device))  # a bad name refused before anything loads
        self.precision, self.compile = precision, compile  # requested: each base settles its own at its load
        self.runs_dir = Path(runs_dir).resolve() if runs_dir is not None else None
        if self.runs_dir is not None and not self.runs_dir.is_dir():
            raise VisionLoraError(f"{runs_dir}: no such folder of runs")
        if max_loaded < 1:
            raise VisionLoraError(f"--max-loaded-adapters must be at least 1, got {max_loaded}")
        self.max_loaded = max_loaded
        self.events = events or StoreEvents()
        self.models: dict[str, ServedModel] = {}
        self.bases: dict[tuple, SharedBase] = {}
        self._lock = threading.Lock()  # the two dicts and the in-flight counts
        self._loading = threading.Lock()  # one load (or unload) at a time
        self._processors: dict[bytes, Any] = {}

    # -- names --------------------------------------------------------------------------
    def run_under_dir(self, name: str) -> Path:
        """The finished run ``name`` under ``runs_dir``; a name that is not one (or leads out of it) is unknown."""
        unknown = UnknownModel(f"no model named {name!r}" + (f" (and no finished run of that name under "
                                                               f"{self.runs_dir})" if self.runs_dir else ""))
        if self.runs_dir is None or not _plain_folder_name(name):
            raise unknown
        folder = self.runs_dir / name
        if folder.resolve().parent != self.runs_dir or not _finished(folder):
            raise unknown
        return folder

    def available(self) -> list[str]:
        """Names of the finished runs under ``runs_dir`` (loaded or not)."""
        if self.runs_dir is None:
            return []
        return sorted(child.name for child in self.runs_dir.iterdir()
                      if _plain_folder_name(child.name) and child.resolve().parent == self.runs_dir
                      and _finished(child))

    def catalogue(self) -> list[dict[str, Any]]:
        """Every loaded run described, then the runs under ``runs_dir`` not loaded now."""
        with self._lock:
            loaded = [served.describe() for served in self.models.values()]
        names = {entry["name"] for entry in loaded}
        return loaded + [{"name": name, "loaded": False} for name in self.available() if name not in names]

    # -- holding runs while they are used ---------------------------------------------------
    def acquire(self, name: str) -> ServedModel | None:
        """The loaded run ``name``, counted in flight until :meth:`release`; None when not loaded."""
        with self._lock:
            served = self.models.get(name)
            if served is not None:
                served.in_flight += 1
                served.last_used = time.time()
            return served

    def release(self, served: ServedModel) -> bool:
        """Count a use of ``served`` done; True when more runs than the bound are loaded (to unload some)."""
        with self._lock:
            served.in_flight -= 1
            return len(self.models) > self.max_loaded

    def unload_beyond_bound(self) -> None:
        """Unload the least recently used idle runs beyond ``max_loaded`` (kept while in flight at their load)."""
        with self._loading:
            self._unload_beyond_bound(keep=None)

    def load(self, name: str) -> ServedModel:
        """The run ``name``, loaded from ``runs_dir`` unless loaded, and counted in flight (as by
        :meth:`acquire`); the least recently used idle runs beyond ``max_loaded`` are unloaded after it."""
        with self._loading:
            served = self.acquire(name)
            if served is not None:
                return served
            folder = self.run_under_dir(name)
            started = time.perf_counter()
            try:
                served = self._load(name, folder, pinned=False)
            except OutOfMemory:
                raise
            except VisionLoraError as err:
                raise VisionLoraError(f"model {name!r} could not be loaded: {err}") from None
            self.events.loaded(name, time.perf_counter() - started)
            self.acquire(name)
            self._unload_beyond_bound(keep=name)
            return served

    # -- runs named explicitly ------------------------------------------------------------------
    def add(self, name: str, run_dir: str | Path) -> ServedModel:
        """Load the run in ``run_dir`` as ``name`` (safetensors only, no checkpoint code), kept loaded."""
        with self._loading:
            if name in self.models:
                raise VisionLoraError(f"a model named {name!r} is already served")
            return self._load(name, run_dir, pinned=True)

    def remove(self, name: str) -> None:
        """Unload ``name``; a base is freed when its last adapter goes."""
        with self._loading:
            with self._lock:
                served = self.models.pop(name, None)
            if served is None:
                raise KeyError(name)
            self._detach(served)
            self.events.unloaded(served)

    # -- loading and unloading ----------------------------------------------------------------
    def _load(self, name: str, run_dir: str | Path, pinned: bool) -> ServedModel:
        """:meth:`_load_run`; an accelerator running out of memory (as the weights move to it, say) is an
        :class:`OutOfMemory`, raised once the allocator's cache is freed."""
        with suppress(torch.OutOfMemoryError, OutOfMemory):  # freed below, once the failed load's tensors are gone
            return self._load_run(name, run_dir, pinned)
        free_cached_memory()
        raise OutOfMemory(f"out of {self.device} memory loading the run; try again later or unload others")

    def _load_run(self, name: str, run_dir: str | Path, pinned: bool) -> ServedModel:
        run = open_run(run_dir)
        with loading_policy(False, False):
            if run.export is not None and run.onnx_base is not None:
                base, slot = self._attach_onnx_adapter(name, run, run.export), name
            elif run.is_onnx:
                base, slot = self._attach_onnx(name, run), None
            else:
                check_weight_files(run.paths.model_dir)
                base, slot = self._attach(name, run)
            processor = self._processor(run)
        self._settle(base, run, processor)
        paths, task, info = run.paths, run.task, run.info
        weights = sorted(paths.model_dir.glob("*.safetensors"))
        refusal: str | None
        if run.onnx_base is not None:
            refusal = "onnxruntime applies one adapter per forward"
        else:
            refusal = mixing_refusal(base.model, slot) if slot else f"{_kind(run)} has no adapter to mix"
        served = ServedModel(name, paths, task, info, processor, base,
                             weights[0].stat().st_size if weights else folder_bytes(paths.model_dir), slot, refusal,
                             pinned)
        with self._lock:
            self.models[name] = served
        return served

    def _settle(self, base: SharedBase, run: RunFolder, processor: Any) -> None:
        """Settle a new base's precision with ``run`` (and compile it with --compile); a bf16 base casts the
        adapter just added to it to bf16 too (peft loads adapters in fp32)."""
        if base.precision is not None:
            if base.precision.name == "bf16":
                with base.lock:
                    cast_to_bf16(base.model)
            return
        precision = settle_precision(base.model, self.precision, run.task, processor, run.info,
                                     lambda: check_images(run.task, run.paths.summary), name=str(run.paths.root))
        if run.export is not None and run.export.get("quantization"):
            precision = Precision("int8", precision.why)
        base.precision = precision
        if self.compile and isinstance(base.model, torch.nn.Module):
            base.compile_seconds = compile_served(base.model, run.task, processor, run.info)

    def _unload_beyond_bound(self, keep: str | None) -> None:
        with self._lock:
            idle = sorted((served for served in self.models.values()
                           if not served.pinned and served.in_flight == 0 and served.name != keep),
                          key=lambda served: served.last_used)
            victims = idle[: max(0, len(self.models) - self.max_loaded)]
            for served in victims:
                del self.models[served.name]
        for served in victims:
            self._detach(served)
            self.events.evicted(served.name)
            self.events.unloaded(served)

    def _detach(self, served: ServedModel) -> None:
        base = served.base
        with base.lock:
            if served.adapter is not None:
                base.slots.release(served.adapter)
            base.adapters.discard(served.name)
        if not base.adapters:
            with self._lock:
                self.bases.pop(base.key, None)

    def _processor(self, run: RunFolder):
        """The run's image processor; runs with the same processor settings share one (it is only read)."""
        settings = (run.paths.model_dir / "preprocessor_config.json").read_bytes()
        if settings not in self._processors:
            self._processors[settings] = run.load_processor()
        return self._processors[settings]

    def _attach_onnx(self, name: str, run: RunFolder) -> SharedBase:
        """An ONNX export's own onnxruntime session (on the CUDA provider where the store's device is CUDA)."""
        model = load_model(run, device=torch.device(self.device))
        base = SharedBase(("onnx", str(run.paths.model_dir.resolve())), model, adapters={name})
        with self._lock:
            self.bases[base.key] = base
        return base

    def _attach_onnx_adapter(self, name: str, run: RunFolder, export: dict[str, Any]) -> SharedBase:
        """One onnxruntime session per ONNX base, holding the adapters of the runs served on it."""
        from visionlora.deploy.onnx_model import load_adapter_run

        key = ("onnx-adapters", str(run.onnx_base))
        with self._lock:
            shared = self.bases.get(key)
        if shared is None:
            model = load_adapter_run(run.paths.root, export, name, torch.device(self.device))
            shared = SharedBase(key, model, slots=model)  # the model forgets an adapter as slots release one
            with self._lock:
                self.bases[key] = shared
        else:
            with shared.lock:
                shared.model.add_adapter(name, run.paths.root / export["adapter"])
        shared.adapters.add(name)
        return shared

    def _attach(self, name: str, run: RunFolder) -> tuple[SharedBase, str | None]:
        """The base ``run`` predicts with (loaded on first need), and the adapter slot holding its adapter."""
        if run.info.mode != "lora":
            model = run.load_full_model().to(self.device).eval()
            base = SharedBase(("full", str(run.paths.model_dir.resolve())), model, adapters={name})
            with self._lock:
                self.bases[base.key] = base
            return base, None
        from peft import PeftModel

        base_ref = run.base_ref
        if Path(base_ref).exists():
            base_ref = str(Path(base_ref).resolve())  # one key for every spelling of a local folder
        revision = run.info.base_revision or base_revision(base_ref) or base_ref
        key = (run.info.task, revision, len(run.info.labels), run.adapter_type())
        shared = self.bases.get(key)
        if shared is None:
            base_model, slots = run.load_base(), AdapterSlots()
            sibling = next((other for other in self.bases.values() if other.key[:2] == key[:2]), None)
            if sibling is not None:  # the same base with a head of another size: one copy of the weights
                if sibling.precision is not None and sibling.precision.name == "bf16":
                    base_model.to(torch.bfloat16)  # and the sibling's precision, settled at its load
                _share_equal_weights(base_model, sibling.weights)  # (the sibling's, on the store's device)
            weights = dict(base_model.named_parameters())
            slot = _fill_slot(run, slots, lambda first: _mixing(PeftModel.from_pretrained(
                base_model, run.paths.model_dir, adapter_name=first).to(self.device).eval()))
            shared = SharedBase(key, slots.model, slots=slots, weights=weights,
                                precision=sibling.precision if sibling is not None else None)
            with self._lock:
                self.bases[key] = shared
        else:
            held = shared.slots
            if not isinstance(held, AdapterSlots):  # ONNX bases are keyed apart and never found here
                raise TypeError(f"the base {key} holds no peft adapter slots")
            with shared.lock:  # peft creates the adapter on the model's device and leaves the model in eval mode
                slot = _fill_slot(run, held, lambda new: (
                    shared.model.load_adapter(run.paths.model_dir, adapter_name=new, torch_device=self.device,
                                              low_cpu_mem_usage=True), _mixing(shared.model))[1])
        shared.adapters.add(name)
        return shared, slot


def _fill_slot(run: RunFolder, slots: AdapterSlots, make: Callable[[str], Any]) -> str:
    """The slot of ``slots`` that holds ``run``'s adapter (:meth:`AdapterSlots.fill`), loaded under the run's
    guard; running out of accelerator memory is an :class:`OutOfMemory`, which the guard passes on (it
    words other errors as damaged or mismatched weights)."""

    def fill() -> str:
        with suppress(torch.OutOfMemoryError):
            return slots.fill(run.paths.model_dir, make)
        raise OutOfMemory("out of accelerator memory loading the adapter")

    return run.attach_adapter(fill)


def _share_equal_weights(model: torch.nn.Module, weights: dict[str, torch.nn.Parameter]) -> None:
    """Point ``model``'s parameters at the equal ones in ``weights`` (same name, shape, type and values),
    wherever those are: a model just loaded on the CPU takes a sibling's weights already on the GPU."""
    for module_name, module in model.named_modules():
        for name, parameter in list(module._parameters.items()):
            other = weights.get(f"{module_name}.{name}" if module_name else name)
            if parameter is not None and other is not None and _equal_anywhere(other, parameter):
                module.register_parameter(name, other)


def _equal_anywhere(other: torch.Tensor, parameter: torch.Tensor) -> bool:
    """Whether ``other`` (on any device) holds the values of ``parameter``, compared on ``parameter``'s device."""
    if other.shape != parameter.shape or other.dtype != parameter.dtype:
        return False
    return torch.equal(other.detach().to(parameter.device), parameter)


def device_for_gpus(gpus: float) -> str:
    """The device of a Ray replica or actor that asked for ``gpus`` GPUs: the CPU for none (Ray does not
    hide the machine's GPUs from such a worker), else CUDA (Ray makes the GPUs it gave the visible ones)."""
    return "cuda" if gpus > 0 else "cpu"


def _mixing(peft_model):
    """``peft_model``, its layers (new ones too) ready for mixed-adapter batches."""
    prepare_mixed_batches(peft_model)
    return peft_model


def _plain_folder_name(name: str) -> bool:
    """A single path component naming a folder inside another (no '..', separators or hidden names)."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _finished(folder: Path) -> bool:
    try:
        open_run(folder)
    except (VisionLoraError, OSError, ValueError):
        return False
    return True


def _kind(run: RunFolder) -> str:
    return "an ONNX model" if run.is_onnx else "a full model"
