"""Django's Redis cache with one client object per connection pool.

Django's ``RedisCacheClient`` builds a new ``redis.Redis`` object for every cache call. That
object is cheap to use but not to build (it copies a table of some 170 response callbacks),
and the rate limiter reads the cache on every API request with a token: about a tenth of a
claim's CPU went into building clients. ``redis.Redis`` is thread-safe (each command borrows a
connection from the pool), so one per pool is enough.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient


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
