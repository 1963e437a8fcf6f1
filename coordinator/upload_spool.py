"""Uploads on their way in, written to scratch files and hashed chunk by chunk.

A stream's payload does not sit in memory while the link delivers it (twenty stalled streams of
a large model would otherwise hold hundreds of MB): each chunk goes to a file under
``<state_dir>/incoming/`` and into a running sha256, so a payload whose digest does not match its
header is refused without being read again. Only the check that follows (decode, shapes, finite
values) holds a payload in memory, a few at a time (`server.max_concurrent_upload_checks`).
Nothing here is acknowledged, so a crash may leave scratch files; the next start removes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_LOGGER = logging.getLogger(__name__)

_PREFIX = "upload-"


class SpooledPayload:
    """One upload's payload in a scratch file: its size and sha256 are known as it arrives."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=_PREFIX)
        self.path = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        """Appends a chunk (to the page cache: a scratch file needs no fsync; the blob store fsyncs
        what is kept). Raises OSError (ENOSPC on a full disk)."""
        assert self._file is not None, "payload already finished"
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Closes the file; returns the payload's sha256 (hex)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self._hash.hexdigest()

    def read(self) -> bytes:
        """The whole payload (blocking: call it from a worker thread)."""
        return self.path.read_bytes()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


class UploadSpool:
    """The folder uploads in flight are written to."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def clear(self) -> int:
        """Creates the folder and removes what a previous process left there (never acknowledged)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.directory.glob(_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            _LOGGER.info("removed %d unfinished upload(s) left in %s", removed, self.directory)
        return removed

    @contextmanager
    def receive(self) -> Iterator[SpooledPayload]:
        """A scratch file for one upload, removed when the block ends (the blob store keeps its own copy)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = SpooledPayload(self.directory)
        try:
            yield payload
        finally:
            payload.discard()
