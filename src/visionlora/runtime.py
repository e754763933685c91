"""Process-level settings a run needs: a fresh Accelerator, the allocator, peak memory."""

from __future__ import annotations

import os
import resource
from typing import Any

import torch

from visionlora.compat import pop_original_forward, reset_accelerate_state


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
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "no", "auto: Apple MPS (auto keeps fp32 there; --mixed-precision bf16 to try it)"
    feature = cpu_bf16_feature()
    if feature:
        return "bf16", f"auto: this CPU has {feature}"
    cap = onednn_cap_without_bf16()
    if cap:
        return "no", f"auto: ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN no bf16 instructions"
    return "no", "auto: this CPU has no native bf16"


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
