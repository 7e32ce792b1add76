"""Output files: atomic writes that survive a power cut, and `spavae run` refusing to replace an earlier run."""

from __future__ import annotations

import os
import stat

import pytest

from spavae.utils import atomic_path


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(descriptor):
        info = os.fstat(descriptor)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else info.st_ino))
        fsync(descriptor)

    def record_replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    target = tmp_path / "result.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("complete")
        written = os.stat(tmp).st_ino
    assert events == [("fsync", written), ("replace", written), ("fsync", "folder")]
    assert target.read_text() == "complete"


def test_a_failed_write_syncs_nothing_and_leaves_the_earlier_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    target = tmp_path / "result.txt"
    target.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert calls == [] and target.read_text() == "earlier" and os.listdir(tmp_path) == ["result.txt"]
