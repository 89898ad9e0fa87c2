"""What is at a path that should be a regular file, for messages.

Opening a FIFO blocks until a writer comes and a device such as /dev/zero never ends, so every
reader of user files (calibration text, weights, cache entries) asks here first; ``os.stat``
follows symlinks and opens nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

_SPECIAL_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def special_file_kind(path: str | os.PathLike[str]) -> str | None:
    """What is at ``path`` when it exists but is not a regular file (links followed): "a FIFO
    (named pipe)", "a symbolic link to /dev/zero, a character device"...; None for a regular
    file or nothing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
    if os.path.islink(path):
        kind = f"a symbolic link to {os.path.realpath(path)}, {kind}"
    return kind
