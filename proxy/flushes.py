"""Cache flushes owed by committed admin changes: tried at once, then retried until done.

A replaced draft's cached answers are no longer its answers. The change is
committed before the flush (flushing first would let a request re-cache an old
answer in between), so a flush that fails — Redis away — cannot undo it: the
admin answer reports the committed change, and the flush is retried here every
``retry_interval`` seconds until Redis takes it. While Redis is away nothing is
served from it either; a process stopped before the retry succeeded logs the
sources still owed a flush (redis-cli flushes them: see the README).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from proxy.cache import CacheUnavailable, RedisCache

logger = logging.getLogger("databroker.flushes")


class Flushes:
    def __init__(self, cache: RedisCache, retry_interval: float = 1.0) -> None:
        self._cache = cache
        self._retry_interval = retry_interval
        self._owed: set[uuid.UUID] = set()
        self._wake = asyncio.Event()

    @property
    def owed(self) -> frozenset[uuid.UUID]:
        return frozenset(self._owed)

    async def flush_source(self, data_source_id: uuid.UUID) -> bool:
        """Flush now; False if Redis refused, the flush then owed to ``run``."""
        if await self._try(data_source_id):
            return True
        logger.warning(
            "cache of data source %s not flushed (Redis unavailable); retrying in the background",
            data_source_id,
        )
        self._owed.add(data_source_id)
        self._wake.set()
        return False

    async def _try(self, data_source_id: uuid.UUID) -> bool:
        try:
            await self._cache.flush_source(data_source_id)
        except CacheUnavailable:
            return False
        self._owed.discard(data_source_id)
        return True

    async def run(self) -> None:
        """Retry what is owed until it is done; runs until cancelled."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._owed:
                    await asyncio.sleep(self._retry_interval)
                    for data_source_id in sorted(self._owed):
                        if await self._try(data_source_id):
                            logger.info("cache of data source %s flushed", data_source_id)
        finally:
            if self._owed:
                logger.error(
                    "stopping with caches not flushed (flush them with redis-cli): %s",
                    ", ".join(map(str, sorted(self._owed))),
                )
