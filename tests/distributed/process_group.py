"""Starting and ending the distributed test scripts' process groups.

Lightning leaves the default process group alive after ``fit``. At interpreter exit each rank then tears gloo's
pairs down on its own; when the other rank has already gone, a worker thread can be destroyed while joinable and
the process aborts ("terminate called without an active exception", exit -6) after every result was written. CI
saw it once on the 2-process DeepSpeed run under load (not reproduced here in 9 runs, 3 of them on a loaded CPU).
The scripts end with a barrier and an explicit destroy (:func:`end_process_group`); the tests start them through
:func:`run_script`, which reruns a script once, from an empty output folder, only when it died of exactly that
abort, and fails on anything else or on a second abort.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import torch.distributed as dist

_EXIT_ABORT = "terminate called without an active exception"


def end_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_script(
    command: list[str], env: dict[str, str], out: Path, timeout: int
) -> subprocess.CompletedProcess:
    """Run ``command`` (which writes under ``out``); rerun once after an abort at exit, as above."""
    folders = [
        p.name for p in out.iterdir() if p.is_dir()
    ]  # the caller's (empty) layout, made again for a rerun
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode == -signal.SIGABRT and done.stderr.rstrip().endswith(_EXIT_ABORT):
        shutil.rmtree(out)
        for name in folders:
            (out / name).mkdir(parents=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return done
