"""The launcher's summary.json: written whole or not at all, and a failed write is reported, not fatal."""

from __future__ import annotations

import errno
import json

import pytest

from libs.cli import launcher


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Whole lines, so a long path is never wrapped in the middle."""
    monkeypatch.setattr(launcher.console, "width", 1000)


def test_summary_is_written_whole(tmp_path, capsys):
    path = tmp_path / "out" / "summary.json"
    assert launcher.write_summary(path, {"scans": [1, 2]})
    assert json.loads(path.read_text()) == {"scans": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_a_write_that_fails_midway_leaves_the_old_summary_and_no_temporary_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}')

    def disk_full(obj, handle, **kwargs):
        handle.write('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(launcher.json, "dump", disk_full)
    assert not launcher.write_summary(path, {"scans": []})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    said = capsys.readouterr().err
    assert str(path) in said and "ENOSPC" in said and f"errno {errno.ENOSPC}" in said


def test_a_summary_that_cannot_be_placed_is_reported(tmp_path, capsys):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    path = blocker / "summary.json"
    assert not launcher.write_summary(path, {"scans": []})
    said = capsys.readouterr().err
    assert str(path) in said and "errno" in said
