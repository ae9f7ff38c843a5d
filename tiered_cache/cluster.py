"""A django-redis client for Redis Cluster, on redis-py's RedisCluster (django-redis has
none). Put it in CACHES as the CLIENT_CLASS; LOCATION names one or more nodes:

    CACHES = {"default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://10.0.0.1:7000,redis://10.0.0.2:7000",
        "OPTIONS": {"CLIENT_CLASS": "tiered_cache.cluster.ClusterClient"},
    }}

Every node listed is a startup node of one cluster client (not a shard of django-redis's
own client-side sharding). Django's cache API works through it as on one server; commands
over several keys are split by slot."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from django_redis.client.default import DefaultClient
from redis.cluster import ClusterNode, RedisCluster

__all__ = ["ClusterClient", "is_cluster_client"]


def is_cluster_client(options: Any) -> bool:
    """Whether a CACHES entry's OPTIONS name this client (or a subclass of it)."""
    name = options.get("CLIENT_CLASS") if isinstance(options, dict) else None
    if isinstance(name, str):
        if name == f"{__name__}.ClusterClient":
            return True
        try:
            cls = import_string(name)
        except ImportError:
            return False
        return isinstance(cls, type) and issubclass(cls, ClusterClient)
    return isinstance(name, type) and issubclass(name, ClusterClient)


class ClusterClient(DefaultClient):  # type: ignore[misc]  # django-redis is untyped
    """django-redis's DefaultClient, talking to a Redis Cluster through one RedisCluster."""

    def __init__(self, server: Any, params: dict[str, Any], backend: Any) -> None:
        super().__init__(server, params, backend)
        # All the listed nodes are startup nodes of one client (index 0).
        servers: list[str] = list(self._server)
        self._startup = servers
        self._server: list[str] = servers[:1]
        self._clients: list[Any] = [None]

    def connect(self, index: int = 0) -> Any:
        nodes = []
        for url in self._startup:
            parsed = urlparse(url if "://" in url else f"redis://{url}")
            if not parsed.hostname:
                raise ImproperlyConfigured(f"Cannot read a Redis Cluster node from {url!r}.")
            nodes.append(ClusterNode(parsed.hostname, parsed.port or 6379))  # type: ignore[no-untyped-call]
        first = urlparse(self._startup[0] if "://" in self._startup[0] else "redis://x")
        kwargs: dict[str, Any] = {}
        for option, arg in (
            ("SOCKET_TIMEOUT", "socket_timeout"),
            ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
            ("USERNAME", "username"),
            ("PASSWORD", "password"),
        ):
            if self._options.get(option) is not None:
                kwargs[arg] = self._options[option]
        if first.password and "password" not in kwargs:
            kwargs["password"] = first.password
        if first.username and "username" not in kwargs:
            kwargs["username"] = first.username
        kwargs.update(self._options.get("CLUSTER_KWARGS", {}))
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def disconnect(self, index: int = 0, client: Any = None) -> None:
        client = client if client is not None else self._clients[0]
        if client is not None:
            client.close()

    # Commands over several keys: a cluster splits them by slot.
    def get_many(
        self, keys: Iterable[Any], version: int | None = None, client: Any = None
    ) -> dict[Any, Any]:
        client = client if client is not None else self.get_client(write=False)
        keys = list(keys)
        if not keys:
            return {}
        made = [self.make_key(k, version=version) for k in keys]
        values = client.mget_nonatomic(made)
        return {k: self.decode(v) for k, v in zip(keys, values, strict=True) if v is not None}
