"""Run ``karlo generate`` as a real process, watch its output appear, and kill it or its Ray from outside."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil

KARLO = str(Path(sys.executable).with_name("karlo"))
FEW_STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]
# One row per batch and one actor per stage: every image equals Karlo.generate([prompt], [seed]) bit for bit
# (pipeline_utils.reference with one thread), however the rows were split between attempts.
_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
ONE_ROW_STAGES = "".join(f"{name}: {{batch_size: 1, actors: 1}}\n" for name in ("prior", "decoder", "super_res"))


def karlo_env(**extra: str) -> dict[str, str]:
    """This process's environment (session caches, test credentials) for a driver that starts its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


@dataclass
class Generate:
    """A running ``karlo generate``; its Ray processes are remembered so that none outlives the test."""

    proc: subprocess.Popen
    log: Path
    ray_processes: list[psutil.Process] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def remember_ray_processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.ray_processes = psutil.Process(self.proc.pid).children(recursive=True)
        return self.ray_processes

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"karlo generate still running after {timeout} s:\n{self.output()[-5000:]}") from None

    def kill_everything(self) -> None:
        """SIGKILL the driver and every Ray process it started that is still alive."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for p in self.ray_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def wait_for_workers_to_exit(self, timeout: float = 60) -> None:
        """After the driver died: its Ray workers must exit by themselves (none may go on writing to OUTPUT).
        Ray's dashboard and runtime-env agents linger; they never touch OUTPUT, and kill_everything ends them."""
        workers = [p for p in self.ray_processes if not _name(p).startswith(_AGENTS)]
        _, alive = psutil.wait_procs(workers, timeout=timeout)
        assert not alive, f"Ray processes of the killed run still alive after {timeout} s: {alive}"


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return ""


def _default_sigint() -> None:
    # A shell without job control starts background commands with SIGINT ignored, and children inherit that: a
    # suite run in the background would then send Ctrl-C to a process that cannot receive it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def generate(args: list[str], log: Path, env: dict[str, str], options: tuple[str, ...] = (),
             interruptible: bool = False) -> Iterator[Generate]:
    """Start ``karlo [OPTIONS] generate ARGS`` in its own session (``interruptible``: with SIGINT handled as in a
    terminal's foreground job); on exit, kill whatever of it is left."""
    with open(log, "w") as out:
        proc = subprocess.Popen([KARLO, *options, "generate", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_sigint if interruptible else None)
    run = Generate(proc, log)
    try:
        yield run
    finally:
        run.remember_ray_processes()
        run.kill_everything()


def run_generate(args: list[str], log: Path, env: dict[str, str], timeout: float = 400,
                 options: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``karlo [OPTIONS] generate ARGS`` to the end; returns (exit code, stdout and stderr)."""
    with generate(args, log, env, options) as g:
        return g.wait(timeout), g.output()


def wait_until(condition: Callable[[], bool], g: Generate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if g.proc.poll() is not None:
            ended = f"karlo generate ended (exit {g.proc.returncode}) before {what}"
            raise AssertionError(f"{ended}:\n{g.output()[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{g.output()[-5000:]}")
        time.sleep(0.1)


def kill_driver(g: Generate) -> None:
    """``kill -9`` of the driver alone, as when its machine or container goes away."""
    g.remember_ray_processes()
    os.kill(g.proc.pid, signal.SIGKILL)
    g.proc.wait()


def kill_local_ray(g: Generate) -> None:
    """``kill -9`` of the driver's local Ray head (GCS and raylet), leaving the driver itself alone."""
    heads = [p for p in g.remember_ray_processes() if _name(p) in ("gcs_server", "raylet")]
    assert sorted(_name(p) for p in heads) == ["gcs_server", "raylet"], [_name(p) for p in g.ray_processes]
    for p in heads:
        p.kill()
