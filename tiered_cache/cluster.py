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
from django_redis.exceptions import ConnectionInterrupted
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

__all__ = ["ClusterClient", "cluster_settings", "is_cluster_client"]


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


def cluster_settings(location: Any, options: Any) -> tuple[list[Any], dict[str, Any]]:
    """The startup nodes and RedisCluster arguments a CACHES entry names (LOCATION: one or
    more comma-separated redis:// URLs; OPTIONS: SOCKET_TIMEOUT, SOCKET_CONNECT_TIMEOUT,
    USERNAME, PASSWORD, and CLUSTER_KWARGS passed as they are). Read without connecting."""
    urls = location.split(",") if isinstance(location, str) else list(location)
    nodes = []
    first = None
    for url in urls:
        parsed = urlparse(url.strip() if "://" in url else f"redis://{url.strip()}")
        if not parsed.hostname:
            raise ImproperlyConfigured(f"Cannot read a Redis Cluster node from {url!r}.")
        first = first or parsed
        nodes.append(ClusterNode(parsed.hostname, parsed.port or 6379))  # type: ignore[no-untyped-call]
    if not nodes:
        raise ImproperlyConfigured("A Redis Cluster LOCATION names no node.")
    kwargs: dict[str, Any] = {}
    for option, arg in (
        ("SOCKET_TIMEOUT", "socket_timeout"),
        ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
        ("USERNAME", "username"),
        ("PASSWORD", "password"),
    ):
        if options.get(option) is not None:
            kwargs[arg] = options[option]
    assert first is not None
    if first.password and "password" not in kwargs:
        kwargs["password"] = first.password
    if first.username and "username" not in kwargs:
        kwargs["username"] = first.username
    if first.scheme == "rediss":
        kwargs["ssl"] = True
    kwargs.update(options.get("CLUSTER_KWARGS", {}))
    return nodes, kwargs


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
        nodes, kwargs = cluster_settings(self._startup, self._options)
        try:
            return RedisCluster(startup_nodes=nodes, **kwargs)
        except RedisClusterException as exc:  # no node reachable: as django-redis says it
            raise ConnectionInterrupted(connection=None) from exc

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
        try:
            values = client.mget_nonatomic(made)
        except _ERRORS as exc:
            raise ConnectionInterrupted(connection=client) from exc
        return {k: self.decode(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def keys(self, search: str, version: int | None = None, client: Any = None) -> list[Any]:
        """KEYS on every master (a plain KEYS would ask one node only)."""
        client = client if client is not None else self.get_client(write=False)
        pattern = self.make_pattern(search, version=version)
        try:
            found = client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        except _ERRORS as exc:
            raise ConnectionInterrupted(connection=client) from exc
        return [self.reverse_key(k.decode() if isinstance(k, bytes) else k) for k in found]


# What a failed cluster call raises (RedisClusterException is not a RedisError).
_ERRORS = (RedisError, OSError, RedisClusterException)
