"""Time and memory of one MVAM (forward + backward) at one decoder level (docs/method.md#mvam).

``bench_mvam_level`` is shared by ``benchmarks/bench_mvam.py`` and anything else that wants the
cost of a level. Memory is reported three ways, because CPU PyTorch has no allocator statistics:

- ``gathered_bytes``: the analytic size of the gathered keys and values, ``M·K·2D·s``
  (``candidate_bytes``), the tensor that dominates MVAM's memory;
- ``profiler_peak_bytes``: the peak of the running sum of every allocation and free the
  PyTorch profiler records (``profile_memory=True``), at operator granularity;
- ``rss_peak_delta_bytes``: the process's resident-set high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus the resident set before the step. Approximate: the
  C allocator may reuse memory it kept from earlier steps. ``None`` where ``/proc`` is absent.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vsad_lightning.geometry.projection import neighbour_mask
from vsad_lightning.models.mvam import MVAM, candidate_bytes


def _proc_status(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def level_homographies(batch: int, views: int, width: int, height: int, seed: int = 0):
    """Plausible view-to-view homographies at a ``width x height`` map: a few degrees of
    rotation, a shift of ~10 % of the map and a little perspective, pair-consistent
    (``H(u→v) = H(v→u)^-1``)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.eye(3, dtype=torch.float64).repeat(batch, views, views, 1, 1)
    for b, v in itertools.product(range(batch), range(views)):
        for u in range(v + 1, views):
            r = torch.rand(5, generator=g, dtype=torch.float64) * 2 - 1
            a = math.radians(10 * r[0].item())
            M = torch.tensor(
                [
                    [math.cos(a), -math.sin(a), 0.1 * width * r[1].item()],
                    [math.sin(a), math.cos(a), 0.1 * height * r[2].item()],
                    [0.02 / width * r[3].item(), 0.02 / height * r[4].item(), 1.0],
                ],
                dtype=torch.float64,
            )
            H[b, v, u], H[b, u, v] = M, torch.linalg.inv(M)
    return H.float()


def measure_step(step: Callable[[], None], repeats: int, profile_memory: bool = True) -> dict:
    """Time ``step`` (after one warm-up call) and measure its memory, side by side.

    Returns ``time_s`` (median), ``time_min_s``, ``rss_peak_delta_bytes`` (VmHWM over VmRSS
    for one more call, when the kernel lets us reset the peak) and ``profiler_peak_bytes``
    (the running sum of torch's CPU allocations in one profiled call; None when not asked).
    """
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    rss_delta = None
    rss_before = _proc_status("VmRSS")
    if rss_before is not None and _reset_rss_peak():
        step()
        peak = _proc_status("VmHWM")
        rss_delta = None if peak is None else max(0, peak - rss_before)

    profiler_peak = None
    if profile_memory:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        running = itertools.accumulate(e.self_cpu_memory_usage for e in events)
        profiler_peak = max(running, default=0)
    return {
        "time_s": statistics.median(times),
        "time_min_s": min(times),
        "profiler_peak_bytes": profiler_peak,
        "rss_peak_delta_bytes": rss_delta,
    }


def bench_mvam_level(
    channels: int,
    h: int,
    w: int,
    V: int = 5,
    *,
    batch: int = 1,
    attention_dim: int = 64,
    num_heads: int = 4,
    window: int = 3,
    num_frequencies: int = 4,
    graph: str = "top_and_ring",
    repeats: int = 5,
    autocast_bf16: bool = False,
    profile_memory: bool = True,
    seed: int = 0,
) -> dict:
    """Forward + backward of one MVAM on ``(batch, V, channels, h, w)``.

    Returns a dict with the configuration, ``time_s`` and ``time_min_s`` (median and minimum of
    ``repeats`` timed steps after one warm-up; on a shared machine the minimum is the steadier),
    ``gathered_bytes``, ``candidate_bytes_total``, ``profiler_peak_bytes`` and
    ``rss_peak_delta_bytes`` (see the module docstring).
    """
    torch.manual_seed(seed)
    module = MVAM(
        channels,
        attention_dim=attention_dim,
        num_heads=num_heads,
        window=window,
        num_frequencies=num_frequencies,
        neighbour_mask=neighbour_mask(graph, V) if V > 1 else None,
    )
    with torch.no_grad():  # a trained W_o, so the backward pass does all of its work
        module.to_out.weight.normal_(std=0.02)
    x = torch.randn(batch, V, channels, h, w, requires_grad=True)
    H = level_homographies(batch, V, w, h, seed)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            out = module(x, H)
        out.float().square().mean().backward()

    measured = measure_step(step, repeats, profile_memory=profile_memory)

    element_size = 2 if autocast_bf16 else 4
    sizes = candidate_bytes(
        batch, V, h, w, attention_dim, window, num_heads, num_frequencies, element_size
    )
    return {
        "channels": channels,
        "h": h,
        "w": w,
        "views": V,
        "batch": batch,
        "attention_dim": attention_dim,
        "candidates": sizes["candidates"],
        "dtype": "bf16-autocast" if autocast_bf16 else "fp32",
        "gathered_bytes": sizes["gathered_kv"],
        "candidate_bytes_total": sizes["total"],
        "input_bytes": x.numel() * 4,
        **measured,
    }
