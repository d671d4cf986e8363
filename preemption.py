"""Stopping cleanly when asked: preemption (SIGTERM, scancel), Ctrl-C (SIGINT) and slurm's warning
before the time limit (SIGUSR1) let the current step finish; then every rank checkpoints and the
run stops, or, on slurm's warning, requeues itself (the job keeps its id, hence its run_dir, and
resumes)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import distributed

log = logging.getLogger("train")


class StopSignals:
    """Catches the stop signals from construction on. A repeated signal changes nothing, as one
    request often arrives twice (slurm signals every process of the step, and torchrun forwards
    what it gets too); except a Ctrl-C repeated more than a second after a SIGINT, which stops the
    rank at once, without a checkpoint. torchrun passes a second Ctrl-C on as SIGTERM, so that
    counts too."""

    def __init__(self):
        self.signal, self.since = 0, 0.0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._note)

    def _note(self, signum, frame):
        now = time.monotonic()
        if self.signal == signal.SIGINT and signum in (signal.SIGINT, signal.SIGTERM) and now - self.since > 1:
            if distributed.is_main():
                log.warning(f"{signal.Signals(signum).name} after SIGINT: stopping at once, without a checkpoint "
                            f"(resume=true continues from the last complete one)")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.signal:
            self.signal, self.since = signum, now
            if distributed.is_main():
                again = "; Ctrl-C again to stop at once, without it" if signum == signal.SIGINT else ""
                log.warning(f"{signal.Signals(signum).name}: finishing this step, then checkpointing and stopping{again}")

    def requested(self) -> bool:
        """Collective: True on every rank if any rank caught a stop signal."""
        agreed = int(distributed.all_max([self.signal], distributed.device())[0])
        # a signal caught during the all-reduce is not in ``agreed``: keep it for the next step
        if agreed and not self.signal:
            self.signal, self.since = agreed, time.monotonic()
        return bool(agreed)

    def requeue(self, step: int, requeue_on_timeout: bool, last_checkpoint: str):
        """After the stop checkpoint: on slurm's time-limit warning, put the job back in the queue;
        otherwise just stop."""
        name = signal.Signals(self.signal).name
        job = os.environ.get("SLURM_JOB_ID")
        if requeue_on_timeout and job and self.signal == signal.SIGUSR1 and distributed.is_main():
            log.warning(f"{name} at step {step}: checkpointed; requeueing slurm job {job}")
            subprocess.run(["scontrol", "requeue", job], check=False)
        else:
            log.warning(f"{name} at step {step}: checkpointed in {last_checkpoint}; stopping")
