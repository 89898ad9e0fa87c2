"""Where a merge is written: a private directory next to OUT, moved to OUT only when whole.

mergekit writes into OUT as it goes, so a run that fails or is stopped leaves shards without a
config where a user would take them for a result, and a clean-up that removes "the OUT this run
started" can remove what another run finished there meanwhile. Here the merge goes to
``.<name>.partial-<host>-<pid>-<random>/<name>`` beside OUT: the same file system, so the final
rename is atomic, and the same last path component, which mergekit's model card takes as the
model's name. A failed run removes only that directory. OUT is refused before any work when
writing it would destroy something that is not a previous merge (an input model, a file, a
directory holding other things).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mergekit_sparsegpt.statistics.cache_dir import file_size_limit

# A previous merge is a flat directory of the files mergekit writes (config, weights, tokenizer,
# card, custom model code); anything else in OUT is data of the user's a replacement would delete.
_MERGE_SUFFIXES = (
    ".json",
    ".safetensors",
    ".bin",
    ".model",
    ".txt",
    ".md",
    ".yml",
    ".py",
    ".jinja",
    ".tiktoken",
)
_PARTIAL = ".partial-"


class OutputError(ValueError):
    """The output directory cannot be written without destroying something of the user's."""


@dataclass(frozen=True)
class StagedOutput:
    final: Path  # OUT, resolved
    root: Path  # our private directory beside OUT
    previous: tuple[int, int] | None  # (device, inode) of the OUT this run replaces, if any
    created: Path | None  # the outermost of OUT's parent directories this run made

    @property
    def path(self) -> Path:
        """The directory mergekit writes the merge into."""
        return self.root / self.final.name


def resolved_output(out_path: str, inputs: Iterable[str]) -> Path:
    """OUT as an absolute, symlink-free path, refused when writing it would destroy user data.

    ``inputs`` are the local directories the merge reads (models, LoRA adapters)."""
    final = Path(os.path.realpath(os.path.expanduser(out_path)))
    if not final.name:
        raise OutputError(f"Output path {out_path!r} names no directory: give a new directory.")
    for source in inputs:
        read = Path(os.path.realpath(source))
        if read == final or final in read.parents:
            what = "is" if read == final else "holds"
            raise OutputError(
                f"Output directory {out_path} {what} the input model {source}: the merge would "
                "overwrite it. Write the merge to a new directory."
            )
    cwd = Path.cwd().resolve()
    if cwd == final or final in cwd.parents:
        raise OutputError(
            f"Output directory {out_path} is (or holds) the current directory {cwd}: choose a "
            "new directory for the merge."
        )
    if final.exists() and not final.is_dir():
        raise OutputError(
            f"Output path {out_path} is an existing file, not a directory: choose a new "
            "directory for the merge (or move the file away)."
        )
    if final.is_dir():
        foreign = _not_merge_output(final)
        if foreign:
            raise OutputError(
                f"Output directory {out_path} holds {foreign}, which no merge writes: only an "
                "empty directory or a previous merge's output is replaced. Write the merge to a "
                "new directory, or empty this one."
            )
    return final


def _not_merge_output(directory: Path) -> str | None:
    """What in ``directory`` a merge does not write (None: empty, or a previous merge's files:
    a config, weights, tokenizer and card files, and nothing else)."""
    entries = sorted(directory.iterdir())
    foreign = [
        f"{entry.name}/" if entry.is_dir() else entry.name
        for entry in entries
        if entry.is_symlink() or not entry.is_file() or not entry.name.endswith(_MERGE_SUFFIXES)
    ]
    if not foreign and entries and not (directory / "config.json").is_file():
        foreign = [entry.name for entry in entries]
    if not foreign:
        return None
    listing = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return listing


def begin(final: Path, say: Callable[[str], None]) -> StagedOutput:
    """Make our private directory beside ``final``; refuse an OUT whose parent is not writable."""
    parent = final.parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final, say)
        root = Path(tempfile.mkdtemp(prefix=_partial_prefix(final) + f"{os.getpid()}-", dir=parent))
    except OSError as error:
        raise OutputError(
            f"Cannot write the output directory {final}: {error.strerror or error} in {parent}. "
            "Choose a directory you can write, with room for the merged model."
        ) from None
    return StagedOutput(final, root, _identity(final), missing[-1] if missing else None)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what is at ``path``: tells the OUT seen at the start from a new one."""
    if not path.exists():
        return None
    status = path.stat()
    return status.st_dev, status.st_ino


def _partial_prefix(final: Path) -> str:
    return f".{final.name}{_PARTIAL}{socket.gethostname()}-"


def _remove_abandoned(final: Path, say: Callable[[str], None]) -> None:
    """Remove the private directories of earlier runs on this host whose process is gone (a
    SIGKILL, a power cut); another host's, or a live process's, are left alone."""
    prefix = _partial_prefix(final)
    for entry in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            say(f"Removing {entry}, left by an earlier merge into {final} that was killed.")
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True


def publish(staged: StagedOutput, say: Callable[[str], None]) -> None:
    """Move the finished merge to OUT, replacing the empty directory or previous merge seen at
    the start, and nothing else: an OUT another run created or replaced meanwhile is kept, and so
    is this merge, in the private directory the message names."""
    if not staged.path.is_dir():  # mergekit moved its output elsewhere (post-fill architectures)
        shutil.rmtree(staged.root, ignore_errors=True)
        return
    if _identity(staged.final) != staged.previous:
        raise OutputError(
            f"Output directory {staged.final} was written by another run while this merge ran; "
            f"it is left as it is, and this merge is in {staged.path}: move it where you want it."
        )
    if staged.previous is not None:
        # Checked again: files may have come since the start (a cache_dir inside OUT, say).
        foreign = _not_merge_output(staged.final)
        if foreign:
            raise OutputError(
                f"Output directory {staged.final} now holds {foreign}, which no merge writes, "
                f"so it is not replaced: it is left as it is, and this merge is in "
                f"{staged.path}: move it where you want it."
            )
        replaced = staged.root / ".replaced"
        os.rename(staged.final, replaced)
        if any(replaced.iterdir()):
            say(f"Replaced the previous merge in {staged.final}.")
    os.rename(staged.path, staged.final)
    shutil.rmtree(staged.root, ignore_errors=True)


def discard(staged: StagedOutput) -> None:
    """Remove what this run made: its private directory and the parents it created, if empty."""
    shutil.rmtree(staged.root, ignore_errors=True)
    if staged.created is None:
        return
    for directory in (staged.final.parent, *staged.final.parent.parents):
        with contextlib.suppress(OSError):  # not empty: another run writes there now
            directory.rmdir()
        if directory == staged.created:
            break


@contextlib.contextmanager
def staged_output(
    out_path: str, inputs: Iterable[str], say: Callable[[str], None]
) -> Iterator[StagedOutput]:
    """Write the merge into ``staged.path``; on success it becomes OUT, on any failure (Ctrl-C,
    SIGTERM included) it is removed and OUT is as it was."""
    staged = begin(resolved_output(out_path, inputs), say)
    try:
        yield staged
    except BaseException as stop:
        discard(staged)
        failure = write_failure(stop, staged.final)
        if failure is not None:
            raise failure from None
        if isinstance(stop, KeyboardInterrupt):
            say(
                f"Merge stopped by {stop or 'Ctrl-C'}; its partial output is removed and "
                f"{staged.final} is as it was before the run."
            )
        raise
    publish(staged, say)


def write_failure(error: BaseException, final: Path) -> OutputError | None:
    """One message for a merged model that did not fit (the file-size limit, a full disk), or
    None for any other error: mergekit writes the output, and its errors name no fix."""
    code = _os_error_code(error)
    if code not in (errno.EFBIG, errno.ENOSPC):
        return None
    start = f"Could not write the merged model to {final} ({os.strerror(code)})"
    if code == errno.ENOSPC:
        return OutputError(
            f"{start}. Free space there, or give an output directory with room for the model."
        )
    limit = file_size_limit()
    if limit is not None:
        return OutputError(
            f"{start}: this process may write files of at most {limit} bytes (ulimit -f). Raise "
            "that limit (ulimit -f unlimited), or write smaller shards with --out-shard-size."
        )
    return OutputError(
        f"{start}: its file system does not take files this large. Write smaller shards with "
        "--out-shard-size, or give an output directory on another file system."
    )


def _os_error_code(error: BaseException) -> int | None:
    """The errno of an ``OSError``, or of a safetensors write, whose ``SafetensorError`` carries
    it in its text only (``I/O error: File too large (os error 27)``)."""
    if isinstance(error, OSError):
        return error.errno
    if not isinstance(error, Exception):
        return None
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None
