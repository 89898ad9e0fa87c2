"""Run one command and write its wall time and peak memory as JSON.

    python benchmarks/perf/launcher.py RESULT.json -- COMMAND [ARGS...]

The benchmark starts every measured command through this small, stdlib-only process instead of
spawning it itself. On Linux a child's ``ru_maxrss`` includes the memory high-water mark of the
process that spawned it (exec carries the old address space's peak over), so a child of the
benchmark, which may hold a whole model in memory, would report at least the benchmark's own
peak. This launcher is a fresh interpreter of a few MiB, so its child's peak is the child's own.

``ru_maxrss`` (from ``os.wait4``: exactly this child's, not the largest of all children) counts
file-backed pages too, such as memory-mapped safetensors shards; ``/proc/<pid>/status`` is
sampled as well to split the peak into anonymous and file-backed memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

KIB = 1024
POLL_INTERVAL_S = 0.02
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile")  # sampled while the child runs, in KiB


def status_bytes(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines()
    except OSError:  # not Linux, or the child has exited
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in STATUS_FIELDS:
            values[name] = int(rest.split()[0]) * KIB
    return values


def sample_until(pid: int, stop: threading.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        for field, value in status_bytes(pid).items():
            peaks[field] = max(peaks.get(field, 0), value)
        stop.wait(POLL_INTERVAL_S)


def run(command: list[str]) -> dict[str, object]:
    start = time.perf_counter()
    child = subprocess.Popen(command)  # stdout and stderr go where the launcher's go
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_until, args=(child.pid, stop, peaks), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall_s = time.perf_counter() - start
    stop.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped above; keep Popen consistent
    return {
        "returncode": child.returncode,
        "wall_s": wall_s,
        "peak_rss_bytes": usage.ru_maxrss * KIB,  # ru_maxrss is in KiB on Linux
        "sampled_peak_bytes": peaks,
    }


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result = run(argv[2:])
    Path(argv[0]).write_text(json.dumps(result), encoding="utf-8")
    return int(result["returncode"] != 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
