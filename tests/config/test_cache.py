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
