"""``profile_steps=[first,last]``: torch.profiler over those steps of the loop, on rank 0.

Rank 0 writes ``run_dir/profile/ops.txt`` (the ops by their own time, summed over the profiled
steps) and ``run_dir/profile/trace.json`` (a Chrome trace: open it in https://ui.perfetto.dev).
The other ranks run unprofiled; their share of every collective shows in rank 0's trace as time
spent waiting in it. Steps are the loop's (``step`` in the logs, counted from 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import distributed

log = logging.getLogger("train")


def check_steps(steps) -> tuple[int, int] | None:
    """``profile_steps`` as (first, last), or None; a ValueError says what is wrong with it."""
    if steps is None:
        return None
    if (not isinstance(steps, Sequence) or len(steps) != 2 or not all(isinstance(s, int) for s in steps)
            or not 1 <= steps[0] <= steps[1]):
        raise ValueError(f"profile_steps={steps}: expected [first, last], steps counted from 1 with "
                         f"first <= last (e.g. profile_steps=[2,3]), or null")
    return steps[0], steps[1]


class StepProfiler:
    """Call ``step()`` after each step of the loop and ``close()`` at its end."""

    def __init__(self, steps, done: int, out_dir: Path, device: torch.device, main: bool):
        """``done``: steps already run (a resumed run starts past some of them)."""
        self.prof, self.out_dir = None, out_dir
        steps = check_steps(steps)
        if steps is None or not main or steps[1] <= done:
            return
        first, last = max(steps[0], done + 1), steps[1]
        # one unprofiled step just before the first: the profiler's own start-up stays out of it
        warmup = 1 if first - 1 - done >= 1 else 0
        self.steps = (first, last)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.prof = profile(activities=activities, record_shapes=True, on_trace_ready=self._write,
                            schedule=schedule(wait=first - 1 - done - warmup, warmup=warmup, active=last - first + 1, repeat=1))
        self.prof.start()

    def _write(self, prof):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        table = prof.key_averages().table(sort_by=self.sort_by, row_limit=40)
        (self.out_dir / "ops.txt").write_text(f"steps {self.steps[0]}-{self.steps[1]}, rank 0\n{table}\n")
        log.info(f"profile of steps {self.steps[0]}-{self.steps[1]}: {self.out_dir}/ops.txt, trace.json")

    def step(self):
        if self.prof is not None:
            self.prof.step()

    def close(self):
        if self.prof is not None:
            self.prof.stop()
            self.prof = None


def peak_memory_gb(device: torch.device) -> float:
    """The largest peak over ranks: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return distributed.all_max([peak], device)[0]
