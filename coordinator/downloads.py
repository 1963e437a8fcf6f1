"""Serving artifacts to clients: only what is published, and the hot ones from memory.

A round's cohort downloads the same few artifacts (the model in each encoding, the strategy's
artifacts) hundreds of times; reading and re-verifying the blob for each request would cost a
disk read, a sha256 and a thread hop per download. The bytes are verified once, when they are
first read, and kept in a cache bounded in bytes (least recently used out first).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from fedgen.coordinator import errors
from fedgen.coordinator.store import BlobStore

#: Memory the cache may hold (a round's artifacts in every encoding are a few MB for the built-in model).
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class ArtifactServer:
    def __init__(
        self, blobs: BlobStore, is_published: Callable[[str], bool], max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self._blobs = blobs
        self._is_published = is_published
        self._max_bytes = max_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    async def get(self, artifact_id: str) -> bytes:
        """The artifact's bytes; NOT_FOUND for anything not published to clients (never another
        client's update, nor anything else in the store)."""
        if not self._is_published(artifact_id):
            raise errors.NotFound(f"artifact {artifact_id[:80]!r} not found")
        data = self._cache.get(artifact_id)
        if data is not None:
            self._cache.move_to_end(artifact_id)
            return data
        try:
            data = await asyncio.to_thread(self._blobs.get, artifact_id)
        except FileNotFoundError:
            raise errors.NotFound(f"artifact {artifact_id[:80]!r} not found") from None
        self._remember(artifact_id, data)
        return data

    def _remember(self, artifact_id: str, data: bytes) -> None:
        if len(data) > self._max_bytes or artifact_id in self._cache:
            return
        self._cache[artifact_id] = data
        self._size += len(data)
        while self._size > self._max_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._size -= len(evicted)
