"""Process-level settings a run needs: its device, a fresh Accelerator, the allocator, peak memory."""

from __future__ import annotations

import os
import re
import resource
from typing import Any

import torch

from visionlora.compat import pop_original_forward, reset_accelerate_state
from visionlora.errors import VisionLoraError

DEVICES = "auto|cpu|cuda[:N]|mps"  # what --device takes
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """The device ``--device requested`` names; ``auto`` picks CUDA, then Apple MPS, then the CPU.

    A named GPU (``cuda:N``) must exist and MPS must be available: a one-line error otherwise.
    """
    name = str(requested).strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise VisionLoraError(f"--device {requested}: expected one of {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    if name == "mps" and not mps_available():
        raise VisionLoraError("--device mps: Apple MPS is not available here (use --device auto or cpu)")
    if name.startswith("cuda"):
        check_cuda_device(name)
    return torch.device(name)


def mps_available() -> bool:
    """Whether this torch build and machine run Apple MPS."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def check_cuda_device(name: str) -> None:
    """Refuse ``cuda`` or ``cuda:N`` (one line) where torch sees no such GPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise VisionLoraError(f"--device {name}: torch sees no CUDA GPU here (use --device auto or cpu)")
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise VisionLoraError(f"--device {name}: there is no GPU {index}; torch sees {count} "
                              f"(cuda:0 to cuda:{count - 1})")


def accelerator_settings(device: torch.device) -> dict[str, Any]:
    """The Accelerator settings that train on ``device`` (an answer of :func:`pick_device`).

    The CPU is Accelerate's ``cpu=True``. Accelerate puts one process on the current CUDA device
    (several processes on ``cuda:LOCAL_RANK``), so ``cuda:N`` makes GPU N the current one
    (``torch.cuda.set_device``) before the Accelerator is made; several processes choose their
    GPUs by ``CUDA_VISIBLE_DEVICES`` instead. MPS is Accelerate's own choice where there is no CUDA.
    """
    if device.type == "cpu":
        return {"cpu": True}
    if device.type == "cuda" and device.index is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise VisionLoraError(f"--device {device}: each of several processes trains on its own GPU "
                                  "(cuda:LOCAL_RANK); choose them with CUDA_VISIBLE_DEVICES and --device auto")
        torch.cuda.set_device(device)
    return {}


def new_accelerator(**kwargs):
    """An Accelerator with these settings, even if another run in this process used others.

    Accelerate keeps its settings in process-wide singletons; the per-run part is reset
    (the process group, if any, is kept) so that runs with different precision can follow
    one another, as in ``demo`` or ``compare``.
    """
    from accelerate import Accelerator

    reset_accelerate_state()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)  # several CPU processes (torchrun): Accelerate's gloo backend
    return Accelerator(**kwargs)


def unwrap_in_fp32(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The prepared model without Accelerate's wrappers, its own ``forward`` back as it was.

    ``unwrap_model(keep_fp32_wrapper=False)`` strips every ``functools.wraps`` layer off a
    mixed-precision forward, transformers' own decorators included (SegFormer then loses the
    hidden states its decode head needs); the forward saved at ``prepare`` is restored instead.
    """
    model = accelerator.unwrap_model(model)
    original = pop_original_forward(model)
    if original is not None:
        model.forward = original
    return model


MPS_AUTO = "auto: Apple MPS (auto keeps fp32 there; --mixed-precision bf16 to try it)"


def resolve_precision(requested: str, fp16_unsafe: str | None = None) -> tuple[str, str]:
    """(precision for Accelerate: no, fp16 or bf16; why) for ``--mixed-precision requested``.

    ``auto`` picks bf16 where the hardware runs it natively (CUDA compute capability 8.0+,
    CPUs with AVX512-BF16 or AMX-BF16, ARM CPUs with the bf16 extension), fp16 with loss
    scaling on older CUDA GPUs unless the task says why its models cannot train in fp16
    (``fp16_unsafe``: DETR-family losses overflow), and fp32 otherwise, Apple MPS included.
    """
    if requested != "auto":
        return requested, "asked for with --mixed-precision" + _emulated_bf16_note(requested)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.get_device_capability() >= (8, 0):
            return "bf16", f"auto: {name} (compute capability 8.0+) runs bf16 natively"
        if fp16_unsafe:
            return "no", f"auto: {name} has no native bf16, and {fp16_unsafe}"
        return "fp16", f"auto: {name} has no native bf16; fp16 with loss scaling"
    if mps_available():
        return "no", MPS_AUTO
    return _cpu_auto_precision("auto: ")


def _cpu_auto_precision(why: str) -> tuple[str, str]:
    """``auto`` on the CPU: bf16 where it runs natively (and oneDNN is not capped below it), else fp32."""
    feature = cpu_bf16_feature()
    if feature:
        return "bf16", f"{why}this CPU has {feature}"
    cap = onednn_cap_without_bf16()
    if cap:
        return "no", f"{why}ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN no bf16 instructions"
    return "no", f"{why}this CPU has no native bf16"


def _emulated_bf16_note(requested: str) -> str:
    """For bf16 asked for on a CUDA GPU without native bf16 (compute capability below 8.0: T4, V100),
    a note that it runs emulated; else nothing. It is allowed: results are right, only slower."""
    if requested != "bf16" or not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (8, 0):
        return ""
    return (f"; note: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no native bf16: "
            "it is emulated, slower than fp16 or fp32 there")


def resolve_precision_on(device: torch.device, requested: str, fp16_unsafe: str | None = None) -> tuple[str, str]:
    """``resolve_precision`` for a run on ``device``: ``auto`` follows that device's rules, not those of
    the device ``auto`` would pick (a CPU run on a machine with a GPU goes by the CPU's bf16)."""
    if device.type == "cuda" and device.index is not None:
        with torch.cuda.device(device):
            return resolve_precision(requested, fp16_unsafe)
    if requested != "auto" and device.type != "cuda":
        return requested, "asked for with --mixed-precision"  # no note about a GPU this run does not use
    if requested != "auto" or device.type == pick_device().type:
        return resolve_precision(requested, fp16_unsafe)
    if device.type == "mps":
        return "no", MPS_AUTO
    return _cpu_auto_precision("auto: --device cpu, and ")


def bf16_note(device: torch.device) -> str | None:
    """A line saying that ``device`` has no native bf16 (by ``resolve_precision``'s rules), or None where it has."""
    precision, why = resolve_precision_on(device, "auto")
    if precision == "bf16":
        return None
    return f"--precision bf16: {device} runs bf16 emulated, not natively ({why.removeprefix('auto: ')})"


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) that still hold bf16 instructions; a lower cap emulates bf16
BF16_ONEDNN_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def onednn_cap_without_bf16() -> str | None:
    """``ONEDNN_MAX_CPU_ISA`` where it caps oneDNN below its bf16 instructions (e.g. ``AVX2``), else None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap and cap not in BF16_ONEDNN_ISAS else None


def cpu_bf16_feature() -> str | None:
    """The CPU feature that runs bf16 natively (AVX512-BF16, AMX-BF16, ARM bf16), or None.

    None also where ``ONEDNN_MAX_CPU_ISA`` caps oneDNN, which runs the matrix products, below
    its bf16 instructions: there bf16 is emulated and slower than fp32.
    """
    if onednn_cap_without_bf16():
        return None
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    for key, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if capabilities.get(key):
            return label
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return None
    features = {word for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
                for word in line.split(":", 1)[-1].split()}
    for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "the ARM bf16 extension")):
        if flag in features:
            return label
    return None


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve allocations over ``threshold`` bytes with their own mappings.

    By default glibc raises that threshold as large blocks are freed, and from then on keeps
    freed activation memory in its heap: a LoRA step on ViT-Base then peaks ~45% above the
    memory it uses. Fixed mappings give the memory back at once, at the cost of page faults.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def reset_peak_memory() -> None:
    """Start the accelerator's peak-memory count afresh, at a run's start: ``peak_memory`` then reports
    that run's peak, not the highest of every run before it in this process (``demo``, ``compare``)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, Any]:
    """The process's peak resident memory, and the accelerator's peak when there is one."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["peak_accelerator_bytes"] = torch.cuda.max_memory_allocated()
    return peak
