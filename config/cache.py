"""Django's Redis cache with one client object per connection pool, and a native async read.

Django's ``RedisCacheClient`` builds a new ``redis.Redis`` object for every cache call. That
object is cheap to use but not to build (it copies a table of some 170 response callbacks),
and the rate limiter reads the cache on every API request with a token: about a tenth of a
claim's CPU went into building clients. ``redis.Redis`` is thread-safe (each command borrows a
connection from the pool), so one per pool is enough.

Django's async cache methods run the sync ones in a thread. The claim's fast path
(``workspaces.fast_claim``) runs on the event loop and reads the rate limiter's counters on
every request, so ``aget_many`` (and ``aadd``, for the refill request after a claim) talk to
Redis with ``redis.asyncio`` instead (one client per event loop: its connections belong to the
loop that made them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient

from config.loops import PerLoop


class ReusingRedisCacheClient(RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        pool = self._get_connection_pool(write)  # pools live as long as this object
        client = self._clients.get(id(pool))
        if client is None:
            # Two threads may both build one on first use; either is fine to keep.
            client = self._clients[id(pool)] = self._client(connection_pool=pool)
        return client


class RedisCache(DjangoRedisCache):
    """``django.core.cache.backends.redis.RedisCache``, reusing its clients."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = ReusingRedisCacheClient
        # The sync pool's socket timeouts apply to the async client too (the other OPTIONS
        # name sync classes).
        timeouts = {k: v for k, v in self._options.items() if k.startswith("socket_")}
        self._async_clients = PerLoop(
            lambda: redis.asyncio.Redis.from_url(self._servers[0], **timeouts)
        )

    async def aget_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        """``get_many`` without leaving the event loop (same keys, same decoded values)."""
        keys = list(keys)
        names = [self.make_and_validate_key(key, version=version) for key in keys]
        values = await self._async_clients.get().mget(names)
        loads = self._cache._serializer.loads
        found = zip(keys, values, strict=True)
        return {key: loads(value) for key, value in found if value is not None}

    async def aadd(
        self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """``add`` without leaving the event loop (``SET NX``, as Django's client does it)."""
        name = self.make_and_validate_key(key, version=version)
        seconds = self.get_backend_timeout(timeout)
        client = self._async_clients.get()
        data = self._cache._serializer.dumps(value)
        if seconds == 0:  # Django's rule: set and expire at once, answering whether it was new
            added = bool(await client.set(name, data, nx=True))
            if added:
                await client.delete(name)
            return added
        return bool(await client.set(name, data, ex=seconds, nx=True))

    async def aclose_async(self) -> None:
        """Close the running loop's client, if it made one."""
        client = self._async_clients.pop()
        if client is not None:
            await client.aclose()
