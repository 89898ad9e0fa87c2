"""Where the statistics cache lives, and what goes wrong writing or reading there.

Every module of the cache logs to one logger, the one users' logging configuration has named
since the cache was a single module.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from mergekit_sparsegpt.special_files import special_file_kind

try:
    import resource
except ImportError:  # not POSIX: no per-process file-size limit to name
    resource = None  # type: ignore[assignment]

LOG = logging.getLogger("mergekit_sparsegpt.statistics.cache")

# Exceptions of reading a safetensors file that is missing, truncated or not one at all.
READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def default_cache_dir() -> Path:
    configured = os.environ.get("MERGEKIT_SPARSEGPT_CACHE")
    if configured:
        return resolved_cache_dir(configured)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return resolved_cache_dir(Path(xdg) / "mergekit_sparsegpt")


def resolved_cache_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """``cache_dir`` as an absolute path: ``~`` expanded, a relative path taken against the
    current directory (mergekit's ``run_merge`` is not told where the config file lies).

    Every name of an entry (lock, checkpoint, messages) derives from this one path, so a
    ``calibrate`` and a merge started in different directories name different entries in
    what they print, instead of silently using two caches under one relative name.
    """
    return Path(cache_dir).expanduser().absolute()


class CacheWriteError(OSError):
    """A cache entry could not be written (disk full, read-only directory...)."""


class CacheFileError(ValueError):
    """Something other than a regular file where the cache keeps an entry."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError into one message that names the entry and the fix."""
    try:
        yield
    except OSError as error:
        raise CacheWriteError(
            f"Could not write the statistics cache entry {path} ({error.strerror or error})"
            f"{_write_fix(error, path.parent)}"
        ) from None


def _write_fix(error: OSError, directory: Path) -> str:
    """The end of a failed write's message: what to change, which depends on why it failed."""
    if error.errno != errno.EFBIG:
        return (
            f". Free space there, make {directory} writable, or set cache_dir (or "
            "MERGEKIT_SPARSEGPT_CACHE) to a writable directory with room for it."
        )
    limit = file_size_limit()
    if limit is not None:
        return (
            f": this process may write files of at most {limit} bytes (ulimit -f). Raise that "
            "limit (ulimit -f unlimited) and rerun."
        )
    return (
        f": the file system of {directory} does not take files this large. Set cache_dir (or "
        "MERGEKIT_SPARSEGPT_CACHE) to a directory on another file system."
    )


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, in bytes); None if unlimited.

    Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the
    process, and the limit can be named.
    """
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def require_regular(path: Path) -> None:
    """Raise a ``ValueError`` naming what is at ``path`` unless it is a regular file (links
    followed) or nothing. Opening a FIFO blocks until another process writes to it, and reading
    a device may never end, so nothing but a regular file is opened."""
    kind = special_file_kind(path)
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not a regular file")
