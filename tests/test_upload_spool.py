"""The scratch files uploads are written to as they arrive."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedgen.coordinator.upload_spool import UploadSpool


def test_a_payload_is_hashed_as_it_is_written_and_removed_after(tmp_path: Path) -> None:
    spool = UploadSpool(tmp_path / "incoming")
    with spool.receive() as payload:
        for chunk in (b"abc", b"", b"defgh"):
            payload.write(chunk)
        assert payload.size == 8
        assert payload.finish() == hashlib.sha256(b"abcdefgh").hexdigest()
        assert payload.read() == b"abcdefgh"
        assert payload.path.parent == tmp_path / "incoming"
    assert not payload.path.exists()


def test_what_a_crash_left_is_removed_at_start_and_nothing_else(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "upload-abc123").write_bytes(b"half an update")
    (incoming / "operator-notes.txt").write_text("not ours")
    assert UploadSpool(incoming).clear() == 1
    assert [p.name for p in incoming.iterdir()] == ["operator-notes.txt"]
