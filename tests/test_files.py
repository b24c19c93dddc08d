"""Atomic writes: permissions under the umask, nothing left by a failure, temps of killed writers removed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from avlink.data.media import write_audio
from avlink.files import TEMP_STALE_SECONDS, atomic_write


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "report.md", lambda temp: temp.write_text("hi"))
        write_audio(tmp_path / "sound.wav", np.zeros(100, np.float32), 16000)
    finally:
        os.umask(old)
    for name in ("report.md", "sound.wav"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_text("old")

    def fail(temp: Path) -> None:
        temp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_temps_of_killed_writers_are_removed_by_the_next_write_of_that_name(tmp_path):
    killed = tmp_path / f".clip.wav.{dead_pid()}-abc123.tmp.wav"  # its writer is gone
    old = tmp_path / f".clip.wav.{os.getppid()}-def456.tmp.wav"  # a live process, but untouched for too long
    live = tmp_path / f".clip.wav.{os.getppid()}-ghi789.tmp.wav"  # a live process writing now: kept
    other = tmp_path / f".other.wav.{dead_pid()}-abc123.tmp.wav"  # another name: not this write's business
    mine = tmp_path / ".clip.wav.notes"  # not a temp name
    for path in (killed, old, live, other, mine):
        path.write_bytes(b"x")
    stale = time.time() - TEMP_STALE_SECONDS - 10
    os.utime(old, (stale, stale))
    write_audio(tmp_path / "clip.wav", np.zeros(100, np.float32), 16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.wav", live.name, other.name, mine.name])
