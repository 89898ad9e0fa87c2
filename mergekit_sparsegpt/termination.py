"""SIGTERM handled like Ctrl-C.

``timeout``, SLURM, ``docker stop`` and torchrun stop a process with SIGTERM, whose default action
ends it at once: no ``finally`` runs, so a merge's private output directory and a pre-pass's
clean-up would be skipped. Raised as :class:`Terminated` (a ``KeyboardInterrupt``), it takes the
path Ctrl-C takes: the partial output is removed, the resume checkpoint is kept and named.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Signal handlers can only be set from the main thread; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
