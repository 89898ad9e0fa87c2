"""Measuring: wall time of in-process calls, and wall time plus peak memory of subprocesses.

Subprocesses run through ``launcher.py``, which explains why a child's peak memory cannot be
read by the benchmark process itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TypeVar

T = TypeVar("T")
LAUNCHER = Path(__file__).resolve().with_name("launcher.py")
OUTPUT_TAIL_LINES = 25


class MeasuredCommandFailed(RuntimeError):
    """A measured subprocess exited with a non-zero status or ran too long."""


@dataclass(frozen=True)
class MeasuredRun:
    """One subprocess: how long it ran and the most memory it held."""

    wall_s: float
    peak_rss_bytes: int  # the kernel's exact high-water mark (ru_maxrss)
    sampled_peak_bytes: dict[str, int]  # /proc status field -> highest sampled value
    stdout: str
    stderr: str

    @property
    def peak_file_backed_bytes(self) -> int:
        return self.sampled_peak_bytes.get("RssFile", 0)

    @property
    def peak_anonymous_bytes(self) -> int:
        return self.sampled_peak_bytes.get("RssAnon", 0)


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Seconds ``call`` took, and what it returned."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def benchmark_env(threads: int) -> dict[str, str]:
    """Environment for measured children: offline, and the thread count used in-process."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_measured(
    command: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 7200
) -> MeasuredRun:
    """Run ``command`` to completion through the launcher; raise ``MeasuredCommandFailed`` with
    the tail of its output when it fails or runs past ``timeout_s``."""
    with (
        tempfile.TemporaryDirectory(prefix="perf_measure_") as scratch,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        result_file = Path(scratch) / "result.json"
        launcher = python_command(str(LAUNCHER), str(result_file), "--", *command)
        # A session of its own, so that a timeout can stop the command along with the launcher.
        process = subprocess.Popen(
            launcher, stdout=out, stderr=err, env=env, start_new_session=True
        )
        timed_out = _wait_or_kill(process, timeout_s)
        stdout, stderr = _read_back(out), _read_back(err)
        if timed_out or process.returncode != 0 or not result_file.is_file():
            why = f"ran past {timeout_s:.0f} s" if timed_out else f"exited {process.returncode}"
            tail = "\n".join((stdout + stderr).strip().splitlines()[-OUTPUT_TAIL_LINES:])
            raise MeasuredCommandFailed(f"{' '.join(command)} {why}:\n{tail}")
        result = json.loads(result_file.read_text(encoding="utf-8"))
    return MeasuredRun(
        wall_s=result["wall_s"],
        peak_rss_bytes=result["peak_rss_bytes"],
        sampled_peak_bytes=result["sampled_peak_bytes"],
        stdout=stdout,
        stderr=stderr,
    )


def _wait_or_kill(process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether ``process`` had to be killed (with its session) after ``timeout_s``."""
    try:
        process.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def _read_back(handle: IO[bytes]) -> str:
    handle.seek(0)
    return handle.read().decode("utf-8", errors="replace")


class CallCounter:
    """How often a function was called while ``counting_calls`` had it wrapped."""

    def __init__(self) -> None:
        self.calls = 0


@contextmanager
def counting_calls(module: ModuleType, name: str) -> Iterator[CallCounter]:
    """Replace ``module.name`` by a wrapper that counts its calls, for the ``with`` block.

    Only callers that look the name up in ``module`` at call time are counted, which is how the
    plugin's pre-pass calls ``capture_layer_hessians``.
    """
    original = getattr(module, name)
    counter = CallCounter()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield counter
    finally:
        setattr(module, name, original)


def directory_bytes(path: Path, pattern: str = "*") -> int:
    """Apparent size of the files matching ``pattern`` directly in ``path``."""
    return sum(file.stat().st_size for file in path.glob(pattern) if file.is_file())


def fresh_directory(path: Path) -> Path:
    """``path``, emptied (created when missing)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
