"""Timers shared by every benchmark: the 20/50/80 % quantiles of a step's time, in ms.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, repetitions
fitted to a time budget), one step function after another; what it measures includes
the host's launch overhead whenever the GPU waits for it. With ``cuda_graph``,
``triton.testing.do_bench_cudagraph`` replays the step captured in a CUDA graph: GPU
time alone, no launch overhead (and no L2 flush between replays). CPU: a warm-up, then
median-of-N wall time with the steps run round-robin within each repetition, so that
drift in clock speed or background load hits all of them alike instead of whichever
happened to run then; a ratio of two steps is then the median of their per-repetition
ratios, in which that drift cancels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

QUANTILES = (0.2, 0.5, 0.8)
Quantiles = tuple[float, float, float]


@dataclass(frozen=True)
class Timing:
    """One step's timing: 20/50/80 % quantiles of a call (ms), the timer ("wall", "events", "cudagraph")
    and, on the CPU, every repetition's time (ms) in round-robin order."""

    quantiles: Quantiles
    timer: str
    samples: tuple[float, ...] = ()

    def ratio_to(self, baseline: Timing) -> float:
        """Time over ``baseline``'s: the median of per-repetition ratios where both were timed round-robin
        (CPU), else the ratio of the medians."""
        if self.samples and len(self.samples) == len(baseline.samples):
            return statistics.median(mine / theirs for mine, theirs in zip(self.samples, baseline.samples, strict=True))
        return self.quantiles[1] / baseline.quantiles[1]


def time_steps(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    reps: int = 15,
    cuda_graph: bool = False,
) -> dict[str, Timing]:
    """name → Timing of one call of ``steps[name]``.

    ``warmup`` and ``reps`` are call counts on the CPU; on CUDA do_bench picks its own
    counts (about 25 ms of warm-up and 100 ms of timed calls per step). A step that
    cannot be captured in a CUDA graph is timed with events instead (its timer says so).
    """
    if device.type != "cuda":
        return _time_round_robin(steps, warmup, reps)
    import triton.testing

    timed = {}
    for name, step in steps.items():
        if cuda_graph:
            try:
                quantiles = triton.testing.do_bench_cudagraph(step, quantiles=list(QUANTILES))
                timed[name] = Timing(tuple(quantiles), "cudagraph")
                continue
            except RuntimeError as error:
                print(f"{name}: no CUDA graph ({str(error).splitlines()[0]}); timing with events")
        timed[name] = Timing(tuple(triton.testing.do_bench(step, quantiles=list(QUANTILES))), "events")
    return timed


def _time_round_robin(steps: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, Timing]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(warmup + reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    levels = torch.tensor(QUANTILES, dtype=torch.float64)
    return {
        name: Timing(tuple(torch.tensor(values, dtype=torch.float64).quantile(levels).tolist()), "wall", tuple(values))
        for name, values in times.items()
    }
