"""Reads: both tiers, keys (guarantee 5), fresh instances (guarantee 9), negative caching,
get_many_cached, the L1 bound, and the errors for wrong input."""

from __future__ import annotations

import functools
import threading
import uuid
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models import QuerySet
from django.db.models.sql import compiler
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import tiered_cache
from tests.cache_fixtures import counters, l1_len, l2_keys, write_outside_django
from tests.ops_helpers import wait_for_bus
from tests.testapp.factories import (
    AccountFactory,
    FlowFactory,
    GlobalModelFactory,
    ProviderModelFactory,
    UserFactory,
)
from tests.testapp.models import Account, Flow, GlobalModel, ProviderModel, User
from tiered_cache import CachedManager, UndeclaredLookup, reads, registry, signals
from tiered_cache.bus import bus
from tiered_cache.registry import model_cache
from tiered_cache.tiers import local_tier, redis_tier

pytestmark = pytest.mark.django_db(transaction=True)


def test_miss_then_l1_hit_then_l2_hit() -> None:
    user = UserFactory()
    assert User.objects.get_cached(pk=user.pk) == user
    assert User.objects.get_cached(pk=user.pk).email == user.email
    tiered_cache.clear_local()
    assert User.objects.get_cached(pk=user.pk).email == user.email
    c = counters(User)
    assert (c["misses"], c["l1_hits"], c["l2_hits"]) == (1, 1, 1)


def test_l1_hit_runs_no_query_and_builds_no_queryset(monkeypatch: Any) -> None:
    user = UserFactory()
    User.objects.get_cached(pk=user.pk)
    built: list[Any] = []
    orig_init = QuerySet.__init__
    monkeypatch.setattr(
        QuerySet, "__init__", lambda self, *a, **k: built.append(1) or orig_init(self, *a, **k)
    )
    monkeypatch.setattr(compiler.SQLCompiler, "as_sql", lambda *a, **k: pytest.fail("compiled"))
    with CaptureQueriesContext(connection) as queries:
        assert User.objects.get_cached(pk=user.pk).pk == user.pk
    assert len(queries) == 0
    assert built == []


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_the_one_function_l1_hit_leaves_every_other_case_to_the_general_read() -> None:
    """reads.hit() serves a plain L1 hit, and reads on past L1 when a plain read misses
    there; every case it does not settle itself goes to reads.get(), which answers as the
    ORM does although the row sits in L1."""
    # Lookups in an order another test resolved would be plain already (below).
    registry.reset_registry()
    mine, other = AccountFactory(balance=50), AccountFactory()
    objects, rich = Account.objects, Account.rich
    # The tiers must be in use: after a slow setup the bus's trust may have lapsed, and a
    # read then goes to the database and L1 answers nothing (seen once on CI, Django 6.1).
    assert bus.wait_trusted(5)
    assert objects.get_cached(pk=mine.pk) == mine  # now in L1
    hits = model_cache(objects).counters
    before = hits.l1_hits
    assert reads.hit(objects, {"pk": mine.pk}) == mine
    # Not in L1 yet: hit() reads on past L1 itself (here from the database).
    misses = hits.misses
    assert reads.hit(objects, {"email": mine.email}) == mine
    assert hits.misses == misses + 1
    assert reads.hit(objects, {"email": mine.email}) == mine
    assert hits.l1_hits == before + 2

    # Several fields: in an order get() has resolved before, with values the ORM takes as
    # given. A value it converts (a str field given a UUID) goes to get().
    flow = FlowFactory(session_id="0f6d8a9e-5a57-4b0b-9a4e-2d3a1c1f7e10")
    ts = {"tenant_id": flow.tenant_id, "session_id": flow.session_id}
    st = {"session_id": flow.session_id, "tenant_id": flow.tenant_id}
    assert Flow.objects.get_cached(**ts) == flow
    assert reads.hit(Flow.objects, ts) == flow
    assert reads.hit(Flow.objects, st) is None  # an order not resolved yet
    assert Flow.objects.get_cached(**st) == flow
    assert reads.hit(Flow.objects, st) == flow
    as_uuid = {**ts, "session_id": uuid.UUID(flow.session_id)}
    assert reads.hit(Flow.objects, as_uuid) is None
    assert Flow.objects.get_cached(**as_uuid) == flow

    # A related manager filters on its instance: the other tenant has no such account.
    related = other.tenant.accounts
    assert reads.hit(related, {"pk": mine.pk}) is None
    with pytest.raises(Account.DoesNotExist):
        related.get_cached(pk=mine.pk)
    # db_manager() reads another database, where the row does not exist.
    elsewhere = objects.db_manager("other")
    assert reads.hit(elsewhere, {"pk": mine.pk}) is None
    with pytest.raises(Account.DoesNotExist):
        elsewhere.get_cached(pk=mine.pk)
    # A copy that reads as the model's own manager does (db_manager(None)) goes to get(),
    # and is not remembered: hit() knows only the model's own instances, by identity, so
    # copies made per request never pile up.
    size = len(registry.plain_managers)
    copy = objects.db_manager(None)
    assert reads.hit(copy, {"pk": mine.pk}) is None
    assert copy.get_cached(pk=mine.pk) == mine
    assert len(registry.plain_managers) == size
    assert registry.plain_managers[id(objects)] == (objects, model_cache(objects))
    # A filtering get_queryset() leaves the poor account out.
    assert reads.hit(rich, {"email": mine.email}) is None
    with pytest.raises(Account.DoesNotExist):
        rich.get_cached(email=mine.email)
    # Values the ORM converts, or takes from an instance: the same row, through get().
    assert reads.hit(objects, {"pk": str(mine.pk)}) is None
    assert objects.get_cached(pk=str(mine.pk)) == mine
    by_instance = {"tenant": mine.tenant, "email": mine.email}
    assert objects.get_cached(**by_instance) == mine
    assert reads.hit(objects, by_instance) is None
    assert objects.get_cached(**by_instance) == mine
    # An instance for a pk that is no relation: refused as Account.objects.get(pk=mine) is.
    assert reads.hit(objects, {"pk": mine}) is None
    with pytest.raises(TypeError, match="expected a number"):
        objects.get_cached(pk=mine)
    # A transaction that wrote the model reads its own write.
    with transaction.atomic():
        Account.objects.filter(pk=mine.pk).update(balance=7)
        assert reads.hit(objects, {"pk": mine.pk}) is None
        assert objects.get_cached(pk=mine.pk).balance == 7
    assert objects.get_cached(pk=mine.pk).balance == 7
    # A remembered absence raises, counted as such.
    with pytest.raises(Account.DoesNotExist):
        objects.get_cached(pk=10**9)
    negatives = hits.negative_hits
    assert reads.hit(objects, {"pk": 10**9}) is None
    with pytest.raises(Account.DoesNotExist):
        objects.get_cached(pk=10**9)
    assert hits.negative_hits == negatives + 1
    # cache_hit receivers hear of the hit.
    heard: list[str] = []

    def receiver(sender: Any, tier: str, **kwargs: Any) -> None:
        heard.append(tier)

    signals.cache_hit.connect(receiver)
    try:
        assert reads.hit(objects, {"pk": mine.pk}) is None
        assert objects.get_cached(pk=mine.pk) == mine
    finally:
        signals.cache_hit.disconnect(receiver)
    assert heard == ["l1"]
    # A manager that picks its database itself (its own db property): get() asks it.
    picking = DatabasePickingManager(lookups=["email"])
    picking.model, picking.name = Account, "picks_its_database"
    assert picking.get_cached(email=mine.email) == mine
    assert reads.hit(picking, {"email": mine.email}) is None
    # So does one that picks the group its reads are invalidated with: a model's own
    # manager of either kind is never taken as plain, so hit() never keys its misses.
    grouping = GroupPickingManager(lookups=["email"])
    grouping.model, grouping.name = Account, "picks_its_group"
    assert model_cache(picking).custom_db and model_cache(grouping).custom_db
    assert not model_cache(objects).custom_db
    assert grouping.get_cached(email=mine.email) == mine
    # A router decides the database: get() asks it.
    with override_settings(DATABASE_ROUTERS=[OtherRouter()]):
        assert reads.hit(objects, {"pk": mine.pk}) is None
        with pytest.raises(Account.DoesNotExist):
            objects.get_cached(pk=mine.pk)
    # A model's own manager with its own get_queryset() is remembered as never plain.
    assert registry.plain_managers[id(rich)] == (rich, None)
    # Django builds new manager instances when a model's _meta caches expire: the new one
    # replaces the old in the map, which holds one entry per (model, manager name).
    size = len(registry.plain_managers)
    Account._meta._expire_cache()
    fresh = Account.objects
    assert fresh is not objects
    assert reads.hit(fresh, {"pk": mine.pk}) == mine
    assert len(registry.plain_managers) == size
    assert id(objects) not in registry.plain_managers


class DatabasePickingManager(CachedManager):
    @property
    def db(self) -> str:
        return "default"


class GroupPickingManager(CachedManager):
    def cache_group_alias(self, read_alias: str) -> str:
        return str(super().cache_group_alias(read_alias))


class OtherRouter:
    """Every read goes to the second database."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


def test_lookup_values_normalized_like_the_orm() -> None:
    user = UserFactory()
    User.objects.get_cached(pk=user.pk)
    assert User.objects.get_cached(pk=str(user.pk)).pk == user.pk
    assert User.objects.get_cached(id=user.pk).pk == user.pk
    c = counters(User)
    assert c["misses"] == 1 and c["l1_hits"] == 2


def test_composite_keys_are_injective() -> None:
    a = FlowFactory(tenant_id="a:b", session_id="c")
    b = FlowFactory(tenant_id="a", session_id="b:c")
    assert Flow.objects.get_cached(tenant_id="a:b", session_id="c").pk == a.pk
    assert Flow.objects.get_cached(tenant_id="a", session_id="b:c").pk == b.pk
    tiered_cache.clear_local()
    assert Flow.objects.get_cached(tenant_id="a", session_id="b:c").pk == b.pk
    assert Flow.objects.get_cached(session_id="c", tenant_id="a:b").pk == a.pk
    assert len(l2_keys(Flow)) == 2


def test_foreign_key_lookup_by_instance_or_id_shares_one_entry() -> None:
    m = ProviderModelFactory()
    got = ProviderModel.objects.get_cached(provider=m.provider, global_model=m.global_model)
    assert got.pk == m.pk
    got = ProviderModel.objects.get_cached(
        provider_id=m.provider_id, global_model_id=m.global_model_id
    )
    assert got.pk == m.pk
    assert counters(ProviderModel)["misses"] == 1


def test_a_foreign_key_declared_by_name_and_by_attname_in_two_lookups() -> None:
    """Each spelling of a field maps to one declared name: a lookup that spells the foreign
    key `tenant` and another that spells it `tenant_id` both resolve, from either kwarg."""
    account = AccountFactory(balance=5)
    both = CachedManager(lookups=[("tenant", "email"), ("tenant_id", "balance")])
    both.model, both.name = Account, "both_spellings"
    assert both.get_cached(tenant=account.tenant_id, email=account.email) == account
    assert both.get_cached(tenant_id=account.tenant_id, email=account.email) == account
    assert both.get_cached(tenant=account.tenant, balance=5) == account  # not unique: the ORM
    assert model_cache(both).declared == [("pk",), ("tenant", "email"), ("tenant", "balance")]


def test_malformed_pk_raises_what_get_raises_and_caches_nothing() -> None:
    with pytest.raises(ValueError) as orm:
        User.objects.get(pk="abc")
    before = l1_len()
    with pytest.raises(ValueError) as cached:
        User.objects.get_cached(pk="abc")
    assert str(cached.value) == str(orm.value)
    assert l1_len() == before
    assert l2_keys(User) == []


def test_wrong_model_instance_is_rejected() -> None:
    m = ProviderModelFactory()
    with pytest.raises(ValueError, match="Must be"):
        ProviderModel.objects.get_cached(provider=m.global_model, global_model=m.global_model)


def test_undeclared_lookup_names_the_declared_ones() -> None:
    with pytest.raises(UndeclaredLookup) as exc:
        User.objects.get_cached(username="x")
    assert isinstance(exc.value, ValueError)
    assert "(username)" in str(exc.value) and "(pk), (email)" in str(exc.value)
    with pytest.raises(UndeclaredLookup, match="tenant_id, session_id"):
        Flow.objects.get_cached(tenant_id="t1")
    with pytest.raises(UndeclaredLookup):
        User.objects.get_cached(pk=1, email="a@b.c")
    assert "Declare it in the manager's lookups" in str(exc.value)
    # A name the model has no field for cannot be declared: the error says so instead.
    with pytest.raises(UndeclaredLookup, match=r"\(nope\) .* testapp.User has no field 'nope'\.$"):
        User.objects.get_cached(nope=1)
    with pytest.raises(
        UndeclaredLookup, match=r"\), not other lookup expressions \(.email__iexact.\)"
    ):
        User.objects.get_cached(email__iexact="a@b.c")
    with pytest.raises(UndeclaredLookup, match=r"'groups' is a reverse or many-to-many relation"):
        User.objects.get_cached(groups=1)


def test_get_many_cached_of_none_is_refused() -> None:
    """in_bulk(None) reads the whole table; get_many_cached(None) says what it takes."""
    from asgiref.sync import async_to_sync

    for read in (User.objects.get_many_cached, async_to_sync(User.objects.aget_many_cached)):
        with pytest.raises(TypeError, match=r"testapp.User: a?get_many_cached\(\) takes an "):
            read(None)


def test_missing_row_is_remembered_and_a_create_ends_it() -> None:
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="ghost@example.com")
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="ghost@example.com")
    tiered_cache.clear_local()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="ghost@example.com")
    c = counters(User)
    assert c["misses"] == 1 and c["negative_hits"] == 2
    user = UserFactory(email="ghost@example.com")
    assert User.objects.get_cached(email="ghost@example.com").pk == user.pk


def test_update_to_a_remembered_value_ends_the_negative_entry() -> None:
    user = UserFactory()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="later@example.com")
    user.email = "later@example.com"
    user.save()
    assert User.objects.get_cached(email="later@example.com").pk == user.pk


def test_negative_timeout_is_honoured(settings: Any) -> None:
    import time

    from tiered_cache.registry import reset_registry

    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "NEGATIVE_TIMEOUT": 0.3}
    reset_registry()
    try:
        user = UserFactory()
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(email="soon@example.com")
        # A write outside Django is invisible to the cache: only the negative timeout
        # ends the entry.
        write_outside_django(
            f"UPDATE {User._meta.db_table} SET email = %s WHERE id = %s",
            ["soon@example.com", user.pk],
        )
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(email="soon@example.com")
        time.sleep(0.4)
        assert User.objects.get_cached(email="soon@example.com").pk == user.pk
    finally:
        reset_registry()


def test_returned_instances_are_the_callers_own() -> None:
    user = UserFactory(preferences={"gpt": {"vision": True}})
    for _ in range(3):  # miss, L1 hit, then L2 hit
        got = User.objects.get_cached(pk=user.pk)
        got.preferences["gpt"]["vision"] = False
        got.preferences["new"] = 1
        got.first_name = "mutated"
        again = User.objects.get_cached(pk=user.pk)
        assert again.preferences == {"gpt": {"vision": True}}
        assert again.first_name == user.first_name
        tiered_cache.clear_local()


def test_json_of_other_models_is_copied_too() -> None:
    gm = GlobalModelFactory()
    got = GlobalModel.objects.get_cached(name=gm.name)
    got.supported_capabilities.append("mutated")
    got.config["context_window"] = 1
    again = GlobalModel.objects.get_cached(name=gm.name)
    assert again.supported_capabilities == gm.supported_capabilities
    assert again.config == gm.config


def test_get_many_cached_one_round_trip_one_query(django_assert_num_queries: Any) -> None:
    users = UserFactory.create_batch(5)
    pks = [u.pk for u in users]
    with django_assert_num_queries(1):
        got = User.objects.get_many_cached([*pks, 10**9])
    assert set(got) == set(pks)
    assert all(got[u.pk].email == u.email for u in users)
    redis_tier.wait_for_fills()  # fills run on the filler thread
    tiered_cache.clear_local()
    with django_assert_num_queries(0):
        got = User.objects.get_many_cached(pks + [10**9])
    assert set(got) == set(pks)
    with django_assert_num_queries(0):
        assert set(User.objects.get_many_cached(pks)) == set(pks)


def test_a_warm_get_many_cached_reads_l2_with_one_mget_and_checks_the_rest_in_lua(
    monkeypatch: Any,
) -> None:
    """Warm, get_many_cached reads every entry with what decides its validity in one MGET
    (row_header.lua's valid(), in Python); only entries found invalid or missing go to
    READ_MANY, which takes their leases. A row written since is not served from L2."""
    users = UserFactory.create_batch(4)
    pks = [u.pk for u in users]
    User.objects.get_many_cached(pks)
    redis_tier.wait_for_fills()
    sent: list[list[str]] = []
    real = redis_tier.scripts

    def spy(calls: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():  # not fills, not stats
            sent.append([getattr(c, "name", None) or c.script.name for c in calls])
        return real(calls, *args, **kwargs)

    monkeypatch.setattr(redis_tier, "scripts", spy)
    tiered_cache.clear_local()
    assert set(User.objects.get_many_cached(pks)) == set(pks)
    # One round trip: an MGET per shard (a cluster has several), nothing else.
    assert len(sent) == 1 and set(sent[0]) == {"MGET"}, sent
    assert counters(User)["l2_hits"] == 4

    User.objects.filter(pk=pks[0]).update(email="new@example.com")
    tiered_cache.clear_local()
    sent.clear()
    got = User.objects.get_many_cached(pks)
    assert got[pks[0]].email == "new@example.com"
    assert all(got[pk].email == u.email for pk, u in zip(pks[1:], users[1:], strict=True))
    assert set(sent[0]) == {"MGET"} and sent[1] == ["READ_MANY"], sent
    assert counters(User)["misses"] == 5  # 4 on the first read, then the written row


def test_l1_holds_at_most_l1_max_entries(settings: Any) -> None:
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "L1_MAX_ENTRIES": 5}
    users = UserFactory.create_batch(12)
    for u in users:
        User.objects.get_cached(pk=u.pk)
    assert l1_len() == 5
    # The five most recent stay; older ones come from L2.
    User.objects.get_cached(pk=users[-1].pk)
    assert counters(User)["l1_hits"] == 1
    assert local_tier.evictions >= 7


def test_l1_entries_expire(settings: Any) -> None:
    import time

    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "L1_TIMEOUT": 0.05}
    from tiered_cache.registry import reset_registry

    reset_registry()
    try:
        user = UserFactory()
        User.objects.get_cached(pk=user.pk)
        redis_tier.wait_for_fills()  # the filler thread may be slow on a loaded machine
        time.sleep(0.1)
        # Trust lapses 0.3 s after the last heartbeat: a loaded run (a Sentinel topology)
        # can pass that while waiting for the fill, and an untrusted read goes to the
        # database. The read under test is made while the bus is trusted.
        wait_for_bus()
        User.objects.get_cached(pk=user.pk)
        assert counters(User)["l1_hits"] == 0 and counters(User)["l2_hits"] == 1
    finally:
        reset_registry()


def test_stats_reports_per_model_counters() -> None:
    user = UserFactory()
    User.objects.get_cached(pk=user.pk)
    User.objects.get_cached(pk=user.pk)
    row = tiered_cache.stats()["testapp.user"]
    assert row["l1_hits"] == 1 and row["misses"] == 1 and row["hit_ratio"] == 0.5
    assert row["l1_entries"] == 1
    assert row["breaker"] == "closed" and row["bus"] == "live"


def test_an_l1_fill_is_refused_by_a_drop_of_its_own_row_only() -> None:
    """L1's fill token: a read that began before a drop stores its row unless that row was
    dropped meanwhile (a busy model's writes to other rows refused most fills); a
    remembered absence or an entry without a row is refused by any drop of its model, a
    flush or a clear refuses everything, and so does a log of drops too long to check."""
    from tiered_cache.tiers.local import _DROP_LOG, NEGATIVE, LocalTier

    l1 = LocalTier()
    token = l1.token("m")
    l1.drop_rows("m", ["x"])
    l1.drop_rows("other", ["y"])
    assert l1.set(("k", "y"), "m", "y", ("y",), 60, token)
    assert not l1.set(("k", "x"), "m", "x", ("x",), 60, token)
    assert not l1.set(("k", "none"), "m", "", NEGATIVE, 60, token)
    assert not l1.set(("k", "fn"), "m", "", ("derived",), 60, token)
    assert l1.set(("k", "none"), "other-model", "", NEGATIVE, 60, l1.token("other-model"))
    # A create drops no cached row, yet it may end a remembered absence.
    token = l1.token("m")
    l1.drop_rows("m", [])
    assert not l1.set(("k", "none"), "m", "", NEGATIVE, 60, token)
    assert l1.set(("k", "w"), "m", "w", ("w",), 60, token)
    token = l1.token("m")
    l1.drop_key(("k", "fn"), "m")
    assert not l1.set(("k", "z"), "m", "z", ("z",), 60, token)
    token = l1.token("m")
    l1.drop_model("m")
    assert not l1.set(("k", "z"), "m", "z", ("z",), 60, token)
    token = l1.token("m")
    for i in range(_DROP_LOG + 1):
        l1.drop_rows("other", [str(i)])
    assert not l1.set(("k", "z"), "m", "z", ("z",), 60, token)
    token = l1.token("m")
    l1.clear()
    assert not l1.set(("k", "z"), "m", "z", ("z",), 60, token)
    assert l1.set(("k", "z"), "m", "z", ("z",), 60, l1.token("m"))
    assert l1.get(("k", "z")) == ("z",)


def test_the_short_way_to_a_row_id_names_the_row_as_writes_do() -> None:
    """ModelCache.row_id_of() skips pk_row_id()'s conversions for a value of the pk's own
    plain type (a multi-table child's pk is its ancestor's); the id must be the one a write
    names, which pk_row_id() gives, for every cached model and every kind of value."""
    from tiered_cache.keys import pk_row_id

    samples: list[Any] = [7, 0, -3, 2**40, "7", "a|b%c", "", True, uuid.uuid4(), 7.0]
    shortcuts = set()
    for model in registry.cached_models():
        for mc in registry.model_caches(model):
            pk = model._meta.pk
            for value in samples:
                try:
                    expected = pk_row_id(pk, value)
                except Exception as exc:  # what the ORM raises for such a value
                    with pytest.raises(type(exc)):
                        mc.row_id_of(value)
                    continue
                assert mc.row_id_of(value) == expected, (model, value)
            if mc._pk_plain is not None:
                shortcuts.add(mc._pk_plain)
    assert shortcuts == {int, str}  # the test app has both kinds of plain pk


def test_the_keys_of_many_pks_are_those_each_pk_has_read_alone() -> None:
    """ModelCache.pk_keys() (get_many_cached) builds all its keys and row ids at once, and
    writes integer pks out by hand (keys.int_encodings): each must be the key a read of
    that one pk uses and the id a write names, for every cached model, every kind of pk
    value, and ints of every size (a long one's encoding is hashed)."""
    samples: list[Any] = [7, 0, -3, 2**40, -(2**63), 10**187, -(10**188), 10**250, "7"]
    samples += ["a|b%c", "", uuid.uuid4(), True]
    for model in registry.cached_models():
        for mc in registry.model_caches(model):
            lk, g = mc.pk_lookup, mc.home
            values = []
            for value in samples:
                try:
                    values.append(lk.preps[0](value))
                except Exception:  # not a value of this pk (the ORM would raise too)
                    continue
            ints = [v for v in values if type(v) is int]
            # Mixed, then ints of a plain size (the written-out form), then all ints.
            for batch in (values, [v for v in ints if abs(v) < 10**100], ints):
                keys, rids = mc.pk_keys(g, g.alias, batch)
                assert keys == [lk.key(g, mc.schema, g.alias, (v,)) for v in batch], model
                assert rids == [mc.row_id_of(v) for v in batch], model


def _leases(model: Any) -> list[bytes]:
    redis_tier.wait_for_fills()
    mc = model_cache(model.objects)
    prefix = f"{mc.home.shards[0].tag}:{mc.schema}:{mc.label}:".replace("[", "[[]")
    return [k for k in redis_tier.client.scan_iter(match=prefix + "*|L", count=1000)]


@pytest.mark.parametrize("many", [False, True], ids=["get_cached", "get_many_cached"])
def test_a_lease_taken_for_a_row_the_cache_cannot_hold_is_given_back(
    monkeypatch: Any, many: bool
) -> None:
    """A miss takes the key's lease, which says a fill follows. When the row read cannot be
    cached (fields deferred), no fill follows: the lease goes back at once, or every other
    reader of the key would wait LEASE_WAIT for nothing until it expired."""
    flow = FlowFactory()
    assert bus.wait_trusted(5)
    mc = model_cache(Flow.objects)
    monkeypatch.setattr(mc.codec, "values", lambda obj: None)  # as for a deferred field
    for _ in range(2):
        if many:
            got = Flow.objects.get_many_cached([flow.pk])[flow.pk]
        else:
            got = Flow.objects.get_cached(pk=flow.pk)
        assert got.pk == flow.pk
        assert _leases(Flow) == [], "a lease outlived a read that could not fill"
    assert counters(Flow)["misses"] == 2


@pytest.mark.parametrize("where", ["manager", "queryset", "decorated", "delegating"])
def test_a_manager_whose_get_is_the_projects_reads_through_it_and_says_why(where: str) -> None:
    """.get() on a manager whose class, or queryset class, has a get() of its own runs that
    code, which may filter by what no key holds (a soft delete, the current tenant): such
    a manager's get_cached() is its get(), every time, and system check W003 says why."""

    class Hiding(QuerySet):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            return QuerySet.get(self.filter(balance__gte=0), *args, **kwargs)

    class Getter(CachedManager):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            return self.get_queryset().filter(balance__gte=0).get(*args, **kwargs)

    class Decorated(CachedManager):
        @functools.wraps(CachedManager.get)
        def get(self, *args: Any, **kwargs: Any) -> Any:
            return self.get_queryset().filter(balance__gte=0).get(*args, **kwargs)

    class Delegating(Getter):  # its get() serves some lookups from the cache itself
        def get(self, *args: Any, **kwargs: Any) -> Any:
            if set(kwargs) == {"pk"}:
                return self.get_cached(**kwargs)
            return super().get(*args, **kwargs)

    manager = {
        "manager": Getter,
        "queryset": CachedManager.from_queryset(Hiding),
        "decorated": Decorated,
        "delegating": Delegating,
    }[where]()
    manager.model, manager.name = Account, f"getter_{where}"  # as contribute_to_class would
    hidden = AccountFactory(balance=-5)
    shown = AccountFactory(balance=5)
    for _ in range(2):
        if where == "delegating":  # by pk its get() is get_cached(): the queryset's answer
            assert manager.get_cached(pk=hidden.pk).pk == hidden.pk
        else:
            with pytest.raises(Account.DoesNotExist):
                manager.get_cached(pk=hidden.pk)
        assert manager.get_cached(pk=shown.pk).pk == shown.pk
    assert model_cache(manager).counters.bypassed >= 4
    assert "get() is the project's own" in (registry.uncacheable_reason(manager) or "")
    assert registry.uncacheable_reason(Account.objects) is None


def test_a_manager_that_defers_fields_reads_the_database_and_says_why() -> None:
    """A row read with fields deferred is not a whole row: such a manager's reads go to the
    database, take no lease, and system check W003 names the reason."""

    class Deferring(CachedManager):
        def get_queryset(self) -> QuerySet:
            return super().get_queryset().defer("data")

    manager = Deferring()
    manager.model, manager.name = Account, "deferring"  # bound as contribute_to_class would
    acc = AccountFactory(data={"a": 1})
    for _ in range(2):
        got = manager.get_cached(pk=acc.pk)
        assert got.get_deferred_fields() == {"data"} and got.data == {"a": 1}
    assert model_cache(manager).counters.bypassed == 2
    assert _leases(Account) == []
    assert "defers fields" in (registry.uncacheable_reason(manager) or "")
