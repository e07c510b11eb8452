"""The Redis cache reuses one client per connection pool and still works as a cache."""

from __future__ import annotations

import threading

from django.core.cache import caches

from config.cache import RedisCache


def test_it_builds_one_client_and_shares_it_between_threads():
    cache = caches.create_connection("default")
    assert isinstance(cache, RedisCache)  # the suite runs on the embedded Redis
    clients = []
    thread = threading.Thread(target=lambda: clients.append(cache._cache.get_client()))
    thread.start()
    thread.join()

    assert cache._cache.get_client() is cache._cache.get_client(write=True) is clients[0]


def test_it_stores_and_reads_values():
    cache = caches.create_connection("default")
    cache.delete_many(["config-cache-test", "config-cache-count"])

    cache.set("config-cache-test", {"n": 1}, timeout=30)
    assert cache.add("config-cache-count", 0, timeout=30)
    assert not cache.add("config-cache-count", 5, timeout=30)
    cache.incr("config-cache-count")

    assert cache.get("config-cache-test") == {"n": 1}
    assert cache.get("config-cache-count") == 1
    cache.delete_many(["config-cache-test", "config-cache-count"])


def test_its_native_async_add_is_the_sync_add():
    import asyncio

    cache = caches.create_connection("default")
    cache.delete_many(["config-cache-aadd", "config-cache-aadd-0"])

    async def adds() -> list[bool]:
        try:
            return [
                await cache.aadd("config-cache-aadd", {"n": 1}, timeout=30),
                await cache.aadd("config-cache-aadd", {"n": 2}, timeout=30),
                await cache.aadd("config-cache-aadd-0", 1, timeout=0),  # Django: gone at once
            ]
        finally:
            await cache.aclose_async()

    assert asyncio.run(adds()) == [True, False, True]
    assert cache.get("config-cache-aadd") == {"n": 1}  # readable by the sync side
    assert not cache.add("config-cache-aadd", 3, timeout=30)
    assert 0 < cache._cache.get_client().ttl(cache.make_key("config-cache-aadd")) <= 30
    assert cache.get("config-cache-aadd-0") is None
    cache.delete_many(["config-cache-aadd", "config-cache-aadd-0"])
