"""bfloat16 on CPUs: detect whether the CPU computes bf16 natively, and warn once when ``train.bf16`` would be slow.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matmuls (convert, compute in fp32, round back), and
a bf16 autocast training step of a ViT measured 4-5x *slower* than fp32 (issue 14, a 2-core cloud CPU). With
AVX512-BF16/AMX (e.g. Sapphire Rapids) oneDNN runs bf16 natively and it is faster than fp32. ``train.bf16`` stays
the recommended setting on CUDA GPUs (Ampere or newer); on a CPU the loop calls :func:`warn_slow_bf16`, which checks
the CPU once (PyTorch's own capability probes, else ``/proc/cpuinfo`` flags), times a small matmul both ways and
warns with the measured ratio when bf16 is not native or measured slower.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

__all__ = ["cpu_bf16_support", "bf16_matmul_slowdown", "warn_slow_bf16"]

log = logging.getLogger(__name__)

_warned = False
_SLOW = 1.5  # bf16/fp32 time ratio above which bf16 counts as slow


def cpu_bf16_support() -> tuple[bool, str]:
    """``(native, evidence)``: whether this CPU has native bf16 arithmetic (AVX512-BF16, AMX-BF16 or ARM BF16).

    Uses ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` when this PyTorch has them, else the
    flags of ``/proc/cpuinfo``; ``evidence`` names what was found.
    """
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    found = {}
    for flag, fn in probes.items():
        probe = getattr(torch.cpu, fn, None)
        if probe is not None:
            try:
                found[flag] = bool(probe())
            except RuntimeError:
                pass
    if found:
        native = [k for k, v in found.items() if v]
        return bool(native), f"torch.cpu probes: {', '.join(native) if native else 'no avx512_bf16, no amx_tile'}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "no PyTorch probe and no /proc/cpuinfo"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(("flags",
                                                                                                  "Features"))), [])
    native = sorted(set(flags) & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(native), f"/proc/cpuinfo flags: {', '.join(native) if native else 'no avx512_bf16, amx_bf16 or bf16'}"


@torch.no_grad()
def bf16_matmul_slowdown(size: int = 512, repeats: int = 5) -> float:
    """Measured time ratio bf16/fp32 of a ``(size, size) @ (size, size)`` matmul on the CPU (median of interleaved
    repeats; about 50 ms). Above 1 means bf16 is slower."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    ab, bb = a.bfloat16(), b.bfloat16()
    a @ b, ab @ bb  # warm-up (first-call dispatch and allocation)
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        t1 = time.perf_counter()
        ab @ bb
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return sorted(ratios)[len(ratios) // 2]


def warn_slow_bf16(device: torch.device) -> bool:
    """Warn once per process when bf16 autocast on this CPU is emulated or measured slow; returns whether it warned
    (``False`` on CUDA, after the first call, or where bf16 is native and fast)."""
    global _warned
    if _warned or device.type != "cpu":
        return False
    _warned = True
    native, evidence = cpu_bf16_support()
    ratio = bf16_matmul_slowdown()
    if native and ratio < _SLOW:
        log.info("train.bf16 on CPU: native bf16 (%s), bf16/fp32 matmul time %.2fx", evidence, ratio)
        return False
    why = "no native bf16 arithmetic" if not native else "bf16 measured slower than fp32"
    log.warning("train.bf16 on this CPU: %s (%s); a bf16 matmul took %.1fx the fp32 time here (an emulated bf16 ViT "
                "training step measured 4-5x slower than fp32). Consider train.bf16=false on CPU; bf16 remains the "
                "recommended setting on CUDA GPUs.", why, evidence, ratio)
    return True
