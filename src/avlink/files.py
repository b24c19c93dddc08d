"""Atomic file writes: the one way avlink writes a file that someone may read (media, weights, reports).

A file is written under a hidden temporary name in its own folder and renamed into place when complete, so
readers see the old file or the new one, never half of one. The temp name is `.<name>.<pid>-<random>.tmp<suffix>`:
a writer killed by SIGKILL leaves it behind, and the next write of the same name removes it once it is stale
(its process is gone from this machine, or it has not been touched for TEMP_STALE_SECONDS, for a writer on another
machine sharing the folder). A finished file gets the permissions of any new file under the umask (mkstemp's
0600 would hide results from the user's group).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

TEMP_STALE_SECONDS = 3600.0


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)-[A-Za-z0-9_]+\.tmp(\.\w+)?$")


def process_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `path` left beside it (see the module docstring); returns what went."""
    target = Path(path)
    pattern, removed, now = _temp_pattern(target.name), [], time.time()
    with suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            with suppress(OSError):
                if not process_running(int(match.group(1))) or now - entry.lstat().st_mtime > TEMP_STALE_SECONDS:
                    entry.unlink()
                    removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by suffix pick the format); it
    replaces `path` when the block succeeds and is removed when it fails. The folder must exist."""
    target = Path(path)
    remove_stale_temps(target)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=f".tmp{target.suffix}",
                                    dir=target.parent)
    os.close(handle)
    try:
        yield Path(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Write `path` through `write(temp_path)`, atomically; creates the folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        write(temp)
