"""Several databases: which one a cached read is answered from, and which writes drop it.

A shard (tests/pg_replica.py PgServer: a cluster of its own, its database named as the test
database, on another port) shares (ENGINE, NAME) with "default". tiered_cache merges such
aliases into one invalidation group on purpose (an extra drop, never a missed one), but it
also took the shard for a streaming replica of "default" and read its misses there: a
row of "default" was served through the shard. Replicas are now told by the servers
themselves (groups.replica_of: in recovery, and the primary's system identifier), and a
real streaming replica (tests/pg_replica.py PgReplica) still reads its misses from the
primary.

A router that reads a model from "other" and writes it to "default" puts what it read in
the group of "default" (managers.cache_group_alias), so a write made straight to "other"
must drop that group too (groups.write_groups).

The ORM is the judge: a cached read answers what the same manager's .get() answers, from
L1 and from L2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connections, models, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import tiered_cache
from tests import coherence_tasks as ct
from tests.cache_fixtures import write_outside_django
from tests.redis_server import free_port
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow, Tenant
from tiered_cache import groups
from tiered_cache.keys import group
from tiered_cache.tiers import redis_tier

SHARDED = pytest.mark.django_db(transaction=True, databases=["default", "shard"])
REPLICATED = pytest.mark.django_db(transaction=True, databases=["default", "replica", "shard"])
ROUTED = pytest.mark.django_db(transaction=True, databases=["default", "other"])
TIERS = pytest.mark.parametrize("tier", ["l1", "l2"])


def at(tier: str) -> None:
    """Next reads are answered from `tier`: L2 once the fills are stored and L1 emptied."""
    if tier == "l2":
        redis_tier.wait_for_fills()
        tiered_cache.clear_local()


def outcome(read: Callable[[], Any]) -> Any:
    """What a read answers, comparable: the row (its database and fields) or the error."""
    try:
        value = read()
    except Exception as exc:
        return ("raises", type(exc).__name__)
    return _row(value) if isinstance(value, models.Model) else ("value", value)


def _row(obj: models.Model) -> tuple[Any, ...]:
    fields = {f.attname: f.value_from_object(obj) for f in obj._meta.concrete_fields}
    return ("row", obj._state.db, fields)


def same(cached: Callable[[], Any], orm: Callable[[], Any], what: str) -> None:
    got, expected = outcome(cached), outcome(orm)
    assert got == expected, f"{what}: cached {got!r}, ORM {expected!r}"


def same_many(manager: Any, pks: list[Any], what: str) -> None:
    got = {pk: _row(o) for pk, o in manager.get_many_cached(pks).items()}
    expected = {pk: _row(o) for pk, o in manager.in_bulk(pks).items()}
    assert got == expected, f"{what}: get_many_cached {got!r}, in_bulk {expected!r}"


def _server_queries(captured: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in captured.captured_queries if "pg_control_system" in q["sql"]]


@pytest.fixture
def aliases(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """aliases(name=entry, ...): a context manager that adds database aliases for its
    block, forgotten after it. Django's test case refuses connections to an alias the test
    does not name in `databases` (its patched ensure_connection), and these cannot be named
    there (they do not exist yet when it checks): the test connects to them unguarded."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    patched = BaseDatabaseWrapper.ensure_connection
    cells = dict(zip(patched.__code__.co_freevars, patched.__closure__ or (), strict=True))
    if "real_ensure_connection" in cells:
        real = cells["real_ensure_connection"].cell_contents
        monkeypatch.setattr(BaseDatabaseWrapper, "ensure_connection", real)

    @contextmanager
    def added(**entries: dict[str, Any]) -> Iterator[None]:
        for name, entry in entries.items():
            connections.settings[name] = entry
        groups.forget()
        try:
            yield
        finally:
            for name in entries:
                connections[name].close()
                del connections[name]
                connections.settings.pop(name, None)
            groups.forget()

    return added


# -- a shard: the same database NAME on another server ---------------------------------


@SHARDED
@TIERS
def test_a_row_of_a_shard_is_read_from_the_shard(pg_shard: Any, tier: str) -> None:
    Tenant.objects.create(pk=1, name="on-default")
    Tenant.objects.using("shard").create(pk=1, name="on-shard")
    Tenant.objects.using("shard").create(pk=2, name="only-on-shard")
    on_shard, on_default = Tenant.objects.db_manager("shard"), Tenant.objects.db_manager("default")
    for step in ("miss", "hit"):
        for manager in (on_shard, on_default):
            for lookup in ({"pk": 1}, {"pk": 2}, {"name": "on-shard"}, {"name": "on-default"}):
                same(
                    lambda: manager.get_cached(**lookup),  # noqa: B023 - called right away
                    lambda: manager.get(**lookup),  # noqa: B023
                    f"{step}: db_manager({manager._db!r}).get_cached({lookup})",
                )
            same_many(manager, [1, 2, 3], f"{step}: db_manager({manager._db!r})")
        at(tier)
    assert groups.replica_of("shard") is None


@SHARDED
def test_each_server_is_asked_once_per_process(pg_shard: Any) -> None:
    """The cost of telling replicas apart: one query per server, at the first miss of an
    alias whose database has an alias on another server; none after."""
    Tenant.objects.create(pk=1, name="on-default")
    Tenant.objects.using("shard").create(pk=1, name="on-shard")
    groups.forget()
    with (
        CaptureQueriesContext(connections["default"]) as on_default,
        CaptureQueriesContext(connections["shard"]) as on_shard,
    ):
        assert Tenant.objects.db_manager("shard").get_cached(pk=1).name == "on-shard"
        # Not in recovery: the shard reads itself, and "default" was not asked.
        assert (len(_server_queries(on_shard)), len(_server_queries(on_default))) == (1, 0)
        assert Tenant.objects.get_cached(pk=1).name == "on-default"
        assert (len(_server_queries(on_shard)), len(_server_queries(on_default))) == (1, 1)
        tiered_cache.clear_local()
        redis_tier.wait_for_fills()
        with pytest.raises(Tenant.DoesNotExist):
            Tenant.objects.db_manager("shard").get_cached(pk=2)
        Tenant.objects.get_cached(name="on-default")
        # "snapshot" is the server of "default" (same address): known already.
        assert groups.replica_of("snapshot") is None
    assert (len(_server_queries(on_shard)), len(_server_queries(on_default))) == (1, 1)


@SHARDED
def test_a_server_that_cannot_be_asked_is_asked_again(
    pg_shard: Any, aliases: Callable[..., Any]
) -> None:
    """Down, or in an aborted transaction: not remembered; the alias reads itself (storing
    nothing: it may be a lagging replica), and the ORM's read raises its own error."""
    down = {**connections["default"].settings_dict, "HOST": "127.0.0.1", "PORT": free_port()}
    with aliases(down=down):
        manager = Tenant.objects.db_manager("down")
        with pytest.raises(OperationalError):
            manager.get_cached(pk=1)
        assert "down" not in groups._replicas

    Tenant.objects.using("shard").create(pk=1, name="on-shard")
    groups.forget()
    manager = Tenant.objects.db_manager("shard")
    with transaction.atomic(using="shard"):
        with pytest.raises(DatabaseError), connections["shard"].cursor() as cursor:
            cursor.execute("SELECT 1 / 0")  # the server's transaction is aborted now
        with pytest.raises(DatabaseError):
            manager.get_cached(pk=1)
        assert "shard" not in groups._replicas
        transaction.set_rollback(True, using="shard")
    # Inside a healthy transaction the question runs in a savepoint and is remembered.
    with transaction.atomic(using="shard"):
        assert manager.get_cached(pk=1).name == "on-shard"
        assert groups._replicas["shard"] == ("",)
        assert Tenant.objects.using("shard").filter(pk=1).exists()


# -- a streaming replica ------------------------------------------------------------


@REPLICATED
def test_a_streaming_replica_still_reads_its_misses_from_the_primary(
    pg_replica: Any, pg_shard: Any
) -> None:
    flows = [FlowFactory(current_step=1) for _ in range(2)]
    pg_replica.wait_replayed()
    replica = Flow.objects.db_manager("replica")
    assert replica.get_cached(pk=flows[0].pk).current_step == 1
    for f in flows:
        ct.write_one(f.pk, "update")  # step 2 on the primary; the replica is 2 s behind
    assert Flow.objects.using("replica").get(pk=flows[0].pk).current_step == 1, (
        "the replica did not lag: the test tests nothing"
    )
    assert (groups.replica_of("replica"), groups.replica_of("shard")) == ("default", None)
    assert groups.replica_of("default") is None
    tiered_cache.clear_local()
    with CaptureQueriesContext(connections["replica"]) as on_replica:
        one = replica.get_cached(pk=flows[0].pk)
        many = replica.get_many_cached([f.pk for f in flows])
    assert (one.current_step, one._state.db) == (2, "replica")
    assert sorted((o.current_step, o._state.db) for o in many.values()) == [(2, "replica")] * 2
    assert not [q for q in on_replica.captured_queries if "testapp_flow" in q["sql"]]


@REPLICATED
def test_a_standby_reads_through_an_alias_only_of_its_own_cluster(
    pg_replica: Any, pg_shard: Any, aliases: Callable[..., Any]
) -> None:
    """The database "postgres" on three servers: a standby of the local server, a server of
    its own, and the local server. The standby reads through the local server's alias,
    never through the other cluster's, and reads itself while its primary is no alias."""
    on = {
        a: {**connections[a].settings_dict, "NAME": "postgres"}
        for a in ("default", "replica", "shard")
    }
    with aliases(standby_pg=on["replica"], shard_pg=on["shard"]):
        assert groups.replica_of("standby_pg") is None
        assert groups.replica_of("shard_pg") is None
    with aliases(standby_pg=on["replica"], shard_pg=on["shard"], primary_pg=on["default"]):
        assert groups.replica_of("standby_pg") == "primary_pg"
        assert groups.replica_of("shard_pg") is None
        assert groups.replica_of("primary_pg") is None


# -- a router that reads from one database and writes to another ---------------------


class ReadOtherWriteDefault:
    """Reads of the test app from "other", its writes to "default"."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "other" if model._meta.app_label == "testapp" else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "default" if model._meta.app_label == "testapp" else None

    def allow_relation(self, *args: Any, **hints: Any) -> bool:
        return True


@pytest.fixture
def read_other_pk() -> Iterator[int]:
    """A tenant of one pk on "other" and on "default", read (and cached) through a router
    that reads "other": the pk."""
    t = Tenant.objects.using("other").create(name="o1")
    Tenant.objects.using("default").create(pk=t.pk, name="d1")
    with override_settings(DATABASE_ROUTERS=[ReadOtherWriteDefault()]):
        assert Tenant.objects.get_cached(pk=t.pk).name == "o1"
        assert Tenant.objects.get_cached(name="o1").pk == t.pk
        yield t.pk


def _same_as_the_orm(pk: int, what: str) -> None:
    same(lambda: Tenant.objects.get_cached(pk=pk), lambda: Tenant.objects.get(pk=pk), what)
    for name in ("o1", "o2"):
        same(
            lambda: Tenant.objects.get_cached(name=name),  # noqa: B023 - called right away
            lambda: Tenant.objects.get(name=name),  # noqa: B023
            f"{what}, by name {name!r}",
        )
    same_many(Tenant.objects, [pk], what)


@ROUTED
def test_the_groups_a_write_changes() -> None:
    other, default = group("other", "testapp.tenant"), group("default", "testapp.tenant")
    assert groups.write_groups("testapp.tenant", "other") == [other]
    with override_settings(DATABASE_ROUTERS=[ReadOtherWriteDefault()]):
        assert groups.write_groups("testapp.tenant", "other") == [other, default]
        assert groups.write_groups("testapp.tenant", "default") == [default]
        # The group of every model of the hierarchy's write database (a proxy, a child).
        assert groups.write_groups("testapp.place", "other") == [
            group("other", "testapp.place"),
            group("default", "testapp.place"),
        ]


@ROUTED
@TIERS
def test_invalidate_through_the_read_database_drops_what_the_router_read(
    read_other_pk: int, tier: str
) -> None:
    write_outside_django(
        "UPDATE testapp_tenant SET name = 'o2' WHERE id = %s", [read_other_pk], "other"
    )
    Tenant.objects.db_manager("other").invalidate(read_other_pk)
    at(tier)
    _same_as_the_orm(read_other_pk, "after invalidate() through 'other'")


@ROUTED
@TIERS
def test_flush_through_the_read_database_drops_what_the_router_read(
    read_other_pk: int, tier: str
) -> None:
    write_outside_django(
        "UPDATE testapp_tenant SET name = 'o2' WHERE id = %s", [read_other_pk], "other"
    )
    Tenant.objects.db_manager("other").flush_cache()
    at(tier)
    _same_as_the_orm(read_other_pk, "after flush_cache() through 'other'")


@ROUTED
@TIERS
@pytest.mark.parametrize("how", ["update", "save", "delete"])
def test_an_orm_write_to_the_read_database_drops_what_the_router_read(
    read_other_pk: int, tier: str, how: str
) -> None:
    if how == "update":
        Tenant.objects.using("other").filter(pk=read_other_pk).update(name="o2")
    elif how == "save":
        tenant = Tenant.objects.using("other").get(pk=read_other_pk)
        tenant.name = "o2"
        tenant.save(using="other")
    else:
        Tenant.objects.using("other").filter(pk=read_other_pk).delete()
    at(tier)
    _same_as_the_orm(read_other_pk, f"after a {how} through 'other'")
