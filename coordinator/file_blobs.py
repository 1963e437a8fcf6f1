"""Blobs as content-addressed files: ``blobs/<sha256[:2]>/<sha256>``, written atomically, verified on
read; a corrupt one is moved to ``blobs/quarantine/``."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from fedgen.coordinator.store import BlobCorrupt, BlobStore, is_digest
from fedgen.core.files import atomic_write


class FileBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            atomic_write(path, data)
        return digest

    def has(self, digest: str) -> bool:
        return is_digest(digest) and self.path(digest).exists()

    def get(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest} is corrupt on disk (digest mismatch)")
        return data

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, digest: str) -> str | None:
        source = self.path(digest)
        if not source.exists():
            return None
        target = self.root / "quarantine" / f"{digest}.{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return str(target)
