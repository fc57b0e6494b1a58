"""Redis is real: a round trip with redis-py, including expiry and a Lua script."""

from __future__ import annotations

import redis


def test_round_trip(stack_endpoints, unique):
    client = redis.Redis.from_url(stack_endpoints.redis_url)
    key = f"test:{unique}"
    try:
        assert client.set(key, "hello", ex=60)
        assert client.get(key) == b"hello"
        assert 0 < client.ttl(key) <= 60
        # Dedup as the notifier will do it: only the first SET NX wins.
        assert client.set(f"{key}:nx", 1, nx=True, ex=60)
        assert not client.set(f"{key}:nx", 1, nx=True, ex=60)
        assert client.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1,
                           f"{key}:n", 41) == 41
    finally:
        client.delete(key, f"{key}:nx", f"{key}:n")
        client.close()
