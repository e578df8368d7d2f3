"""Run a job in real processes joined by torch.distributed (gloo, CPU), each under a timeout.

`run_ranks(job, tmp_path)` starts `world` Python processes that call `jobs.<job>(folder)` inside a
process group (a file store in `folder`, so no port is needed), and returns what each printed.
A job that hangs fails the test after `timeout` seconds instead of blocking the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

_BOOT = """
import os, sys, torch.distributed as dist
sys.path[:0] = [{tests!r}, {root!r}]
rank, world, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + folder + "/store", rank=rank, world_size=world)
import jobs
jobs.{job}(folder)
dist.barrier()  # leave together: tearing down while the other process still talks aborts
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip C++ static destructors: gloo's leftover threads can abort the exit under load (cli.console)
"""


@dataclass
class Finished:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def environment() -> dict[str, str]:
    """One thread per process (two processes share this machine's two cores) and the tests on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    env.pop("CI", None)
    return env


def run_ranks(job: str, folder: Path, world: int = 2, timeout: float = 120) -> list[Finished]:
    code = _BOOT.format(tests=str(TESTS), root=str(ROOT), job=job)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r), str(world), str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(),
        )
        for r in range(world)
    ]
    return [_wait(r, p, timeout, processes) for r, p in enumerate(processes)]


def run_command(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """A command (e.g. torchrun) under a timeout: a hang is a failure, not a blocked suite."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environment())
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{argv[:6]} did not finish in {timeout} s (hung?)\n{expired.stderr}") from None


def _wait(rank: int, process: subprocess.Popen, timeout: float, everyone: list[subprocess.Popen]) -> Finished:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in everyone:
            p.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"rank {rank} did not finish in {timeout} s (hung?)\n{stderr[-3000:]}") from None
    return Finished(rank, process.returncode, stdout, stderr)


def succeeded(finished: list[Finished]) -> list[Finished]:
    for f in finished:
        assert f.returncode == 0, f"rank {f.rank} failed:\n{f.stderr[-4000:]}"
    return finished
