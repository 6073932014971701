"""Where a step's GPU time goes: kernels grouped by kind, from one torch.profiler trace.

``profile_steps(step, iters)`` runs ``step`` under the profiler and returns per-step milliseconds of each kernel
kind (matmul, attention, fused/compiled elementwise, eager elementwise, normalization, optimizer, copies,
other), the GPU-busy total, the wall time, and the top kernels. Wall minus busy is time the GPU waited on the
host (launch overhead, synchronizations); shares are of the wall time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins: a kernel name containing any of these substrings belongs to that kind.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "sm90_", "sm80_", "matmul")),
    ("norm", ("layer_norm", "layernorm", "group_norm", "groupnorm", "batch_norm")),
    ("convolution", ("conv", "implicit", "winograd", "cudnn")),
    ("compiled fused", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cat", "fill")),
    ("eager elementwise", ("elementwise", "vectorized", "reduce", "unrolled", "index")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "other"


def _self_device_us(entry) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(entry, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_steps(step: Callable[[], None], wall_ms: float, iters: int = 3, top: int = 25) -> dict:
    """Profile ``iters`` calls of ``step`` (already warmed up); figures are per step.

    ``wall_ms`` is the step time measured without the profiler (which slows the host down); GPU time is
    taken from the kernels' own durations (CUDA activity only: CPU-side tracing of thousands of small ops
    costs seconds per step).
    """
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for entry in prof.key_averages():
        ms = _self_device_us(entry) / 1000.0 / iters
        if ms <= 0:
            continue  # host-side entries: their kernels are listed on their own
        per_kind[kind_of(entry.key)] += ms
        kernels.append((entry.key, ms, entry.count // iters))
    busy = sum(per_kind.values())
    kernels.sort(key=lambda k: -k[1])
    return {
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": busy,
        "gpu_idle_share": max(0.0, 1 - busy / wall_ms),
        "kinds_ms_per_step": {k: round(v, 3) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "kinds_share_of_wall": {k: round(v / wall_ms, 4) for k, v in per_kind.items()},
        "top_kernels": [
            {"name": name[:160], "kind": kind_of(name), "ms_per_step": round(ms, 3), "calls": n}
            for name, ms, n in kernels[:top]
        ],
    }


def summary(profile_result: dict) -> str:
    """One line per kernel kind, for logs."""
    wall = profile_result["wall_ms_per_step"]
    parts = [f"wall {wall:.1f} ms, GPU busy {profile_result['gpu_busy_ms_per_step']:.1f} ms"]
    parts += [f"{k} {v:.1f}" for k, v in profile_result["kinds_ms_per_step"].items()]
    return "; ".join(parts)


# ---- memory: what is alive at the peak --------------------------------------------------------------------


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replays one device's allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): returns the
    peak of allocated bytes reached during it and the blocks alive at that moment (``size`` and ``frames``).
    Blocks allocated before recording started are not in the trace, so the peak is relative to them."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: list[dict] = []
    for event in trace:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif action in ("free_requested", "free") and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, at_peak


def where_allocated(event: dict, package: str = "walt/") -> str:
    """The innermost stack frame of an allocation inside ``package`` (file:line function), else the innermost."""
    frames = event.get("frames") or []
    for frame in frames:
        if package in frame.get("filename", ""):
            return f"{frame['filename'].split(package, 1)[-1]}:{frame['line']} {frame['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def memory_at_peak(fn: Callable[[], object], top: int = 12) -> dict:
    """Runs ``fn`` once on the current CUDA device with the allocator's history recorded; returns the peak of
    the bytes it allocated (beyond what was alive before) and the largest groups of blocks alive at that
    peak, grouped by the line of walt that allocated them."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, blocks = live_at_peak(trace)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for block in blocks:
        group = groups[where_allocated(block)]
        group[0] += block["size"]
        group[1] += 1
    largest = sorted(groups.items(), key=lambda item: -item[1][0])[:top]
    return {
        "peak_gib_above_start": peak / 2**30,
        "at_peak": [{"where": w, "gib": size / 2**30, "blocks": n} for w, (size, n) in largest],
    }
