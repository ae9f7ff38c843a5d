"""tiered_cache.maintenance, reporting, dashboard and metrics: stats of all processes pushed
in batches, hot rows, warmup sets, cleanup of hot samples and silent processes, L2 sizes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.test import Client, override_settings

import tiered_cache
from tests.cache_fixtures import l2_keys
from tests.ops_helpers import pk_of_key, read
from tests.testapp.factories import UserFactory
from tests.testapp.models import GlobalModel, User
from tiered_cache import dashboard, maintenance, registry, reporting
from tiered_cache.conf import conf
from tiered_cache.counters import hot
from tiered_cache.registry import first_model_cache
from tiered_cache.tiers import redis_tier
from tiered_cache.tiers.remote import Unavailable

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]


def user_mc() -> Any:
    mc = first_model_cache(User)
    assert mc is not None
    return mc


def forget_hot_rows() -> None:
    mc = user_mc()
    redis_tier.client.delete(
        mc.home.hot_key(mc.label), mc.home.hot_decay_key(mc.label), mc.home.procs_key(mc.label)
    )


@pytest.fixture(autouse=True)
def pushed_before() -> None:
    """Start each test with nothing of earlier tests left to push."""
    reporting.publish_stats()
    hot.take()


def test_reads_make_no_redis_call_and_one_push_carries_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    reporting.publish_stats()
    before = reporting.cluster_stats([User])["testapp.user"]
    calls = []
    real_call, real_scripts = redis_tier.call, redis_tier.scripts
    monkeypatch.setattr(redis_tier, "call", lambda fn: calls.append("call") or real_call(fn))
    monkeypatch.setattr(redis_tier, "scripts", lambda c: calls.append("scripts") or real_scripts(c))

    for _ in range(200):
        User.objects.get_cached(pk=user.pk)  # L1 hits
    assert calls == []

    pushed = reporting.publish_stats()
    assert calls == ["call"], "one pipeline for counters and hot rows of every model"
    monkeypatch.undo()
    assert pushed["counters"]["testapp.user"]["l1_hits"] == 200
    assert pushed["hot"]["testapp.user"] in (200 // hot.SAMPLE_EVERY, 200 // hot.SAMPLE_EVERY + 1)
    after = reporting.cluster_stats([User])["testapp.user"]
    assert after["l1_hits"] - before["l1_hits"] == 200
    assert after["processes"] >= 1
    assert after["hot"][0][0] == str(user.pk)
    # Nothing new: nothing to push.
    assert reporting.publish_stats() == {"counters": {}, "hot": {}}


def test_a_get_many_samples_its_rows_as_one_read_each_would() -> None:
    """get_many_cached samples the rows it served from L2 with one touch_many() call: the
    same rows, counted the same, as touch() of each in turn, wherever the tick stands."""
    from tiered_cache.counters import HotRows

    for tick in range(2 * HotRows.SAMPLE_EVERY):
        for n in (0, 1, 15, 16, 17, 100):
            one, many = HotRows(), HotRows()
            one.tick = many.tick = tick
            for pk in range(n):
                one.touch("m", pk)
            many.touch_many("m", list(range(n)))
            assert (many.tick, many.counts) == (one.tick, one.counts), (tick, n)


def test_a_push_that_fails_is_retried_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    user = UserFactory()
    hot.take()
    for _ in range(33):
        read(User.objects, pk=user.pk)
    before = reporting.cluster_stats([User])["testapp.user"]["l1_hits"]
    samples = sum(hot.counts["testapp.user"].values())
    assert samples >= 1

    def down(fn: Any) -> Any:
        raise Unavailable("down")

    monkeypatch.setattr(redis_tier, "call", down)
    with pytest.raises(Unavailable):
        reporting.publish_stats()
    monkeypatch.undo()

    pushed = reporting.publish_stats()
    assert pushed["counters"]["testapp.user"]["l1_hits"] == 32
    assert pushed["hot"]["testapp.user"] == samples  # the samples were kept, not lost
    assert reporting.cluster_stats([User])["testapp.user"]["l1_hits"] == before + 32


def test_the_publisher_thread_pushes_on_its_own() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)

    def served() -> int:
        # Every read counts, whichever tier served it: under a loaded CI machine the bus's
        # trust may lapse between two reads, and such a read is an L2 hit, not an L1 one.
        row = reporting.cluster_stats([User])["testapp.user"]
        return sum(row[k] for k in ("l1_hits", "l2_hits", "negative_hits", "misses"))

    before = served()
    # The bus may have started this thread already, sleeping the configured interval: the
    # override below only shortens its next sleep, so wait one whole interval more.
    patience = conf.STATS_FLUSH_INTERVAL + 5
    with override_settings(TIERED_CACHE={**conf.raw, "STATS_FLUSH_INTERVAL": 0.05}):
        reporting.publisher.start()
        reporting.publisher.start()  # idempotent
        for _ in range(5):
            User.objects.get_cached(pk=user.pk)
        deadline = time.monotonic() + patience
        while served() < before + 5:
            assert time.monotonic() < deadline, "the publisher thread pushed nothing"
            time.sleep(0.05)
    threads = [t for t in __import__("threading").enumerate() if t.name == "tiered_cache-stats"]
    assert len(threads) == 1


def test_counters_replaced_by_reset_stats_are_pushed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reset_stats() replaces a model's counters; the next push must count the new ones
    from zero. Told apart by id(), a new Counters could sit at the address of one freed
    since and be taken for the counters already pushed: its reads then went unpushed
    until they outnumbered the old totals (the publisher test's flake on CI). Here id()
    answers the same for every object in reporting, as address reuse makes it answer for
    some: the counters must be told apart without it."""
    monkeypatch.setattr(reporting, "id", lambda obj: 0, raising=False)
    user = UserFactory()
    read(User.objects, pk=user.pk)
    label = first_model_cache(User).label  # type: ignore[union-attr]
    reporting.publish_stats()
    for _ in range(3):
        reporting.reset_stats()
        User.objects.get_cached(pk=user.pk)
        pushed = reporting.publish_stats()["counters"].get(label, {})
        assert pushed.get("l1_hits", 0) + pushed.get("l2_hits", 0) == 1, pushed


def test_warmup_uses_the_managers_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen, other = UserFactory(first_name="vip"), UserFactory()
    monkeypatch.setattr(
        User.objects,
        "warmup_queryset",
        lambda: User.objects.filter(first_name="vip"),
        raising=False,
    )

    result = maintenance.warmup(User)

    assert result["source"] == "warmup_queryset" and result["stored"] == 1
    assert [pk_of_key(k) for k in l2_keys(User)] == [chosen.pk]
    assert other.pk not in [pk_of_key(k) for k in l2_keys(User)]
    assert maintenance.warmup(User, limit=0)["stored"] == 0


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_warmup_stores_the_hooks_rows_as_the_manager_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hook only picks rows: one that reads another database, or past the manager's own
    filter, must not put rows in the tiers that .get() on the manager does not give."""
    from tests.testapp.factories import AccountFactory
    from tests.testapp.models import Account

    poor, rich = AccountFactory(balance=1), AccountFactory(balance=500)
    monkeypatch.setattr(
        Account.rich, "warmup_queryset", lambda: Account._base_manager.all(), raising=False
    )
    here = UserFactory(first_name="here")
    User.objects.db_manager("other").create(pk=here.pk, username="x", email="x@o.test")
    only_there = User.objects.db_manager("other").create(username="y", email="y@o.test")
    monkeypatch.setattr(
        User.objects,
        "warmup_queryset",
        lambda: User._base_manager.using("other").all(),
        raising=False,
    )
    for limit in (None, 10):
        for model in (Account, User):
            maintenance.warmup(model, limit=limit)
        tiered_cache.clear_local()  # served from what warmup stored in L2
        for manager, pk in (
            (Account.rich, poor.pk),
            (Account.rich, rich.pk),
            (User.objects, here.pk),
            (User.objects, only_there.pk),
        ):
            try:
                expected: Any = manager.get(pk=pk).__dict__.get("first_name", pk)
            except manager.model.DoesNotExist:
                expected = "DoesNotExist"
            try:
                got: Any = manager.get_cached(pk=pk).__dict__.get("first_name", pk)
            except manager.model.DoesNotExist:
                got = "DoesNotExist"
            assert got == expected, (manager.name, pk, limit)
        assert User.objects.get_cached(pk=here.pk).first_name == "here"


def test_warmup_hook_returning_something_else_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.testapp.models import Tenant

    for wrong, named in (
        (lambda: list(User.objects.all()), "not list"),
        (lambda: Tenant.objects.all(), "not .*QuerySet of testapp.Tenant"),
    ):
        monkeypatch.setattr(User.objects, "warmup_queryset", wrong, raising=False)
        with pytest.raises(
            TypeError,
            match=f"objects.warmup_queryset\\(\\) must return a QuerySet of testapp.User, {named}",
        ):
            maintenance.warmup(User)


def test_a_warmup_hook_runs_once_however_many_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample (or a ranking) read again per page would drift past its limit."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    User.objects.bulk_create(
        User(username=f"u{i}", email=f"u{i}@x.test", first_name="vip") for i in range(600)
    )
    monkeypatch.setattr(
        User.objects,
        "warmup_queryset",
        lambda: User._base_manager.filter(first_name="vip").order_by("?"),
        raising=False,
    )
    with CaptureQueriesContext(connection) as queries:
        assert maintenance.warmup(User, limit=550)["stored"] == 550
    assert sum("RANDOM()" in q["sql"] for q in queries.captured_queries) == 1


def test_a_warmup_hook_may_name_multi_table_relatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.testapp.models import Place, Restaurant

    Place.objects.create(name="plain")
    restaurant = Restaurant.objects.create(name="r")
    monkeypatch.setattr(
        Place.objects, "warmup_queryset", lambda: Restaurant.objects.all(), raising=False
    )
    monkeypatch.setattr(
        Restaurant.objects, "warmup_queryset", lambda: Place.objects.all(), raising=False
    )
    for model in (Place, Restaurant):
        assert maintenance.warmup(model)["stored"] == 1, model
        assert [pk_of_key(k) for k in l2_keys(model)] == [restaurant.pk]


def test_a_warmup_limit_past_any_table_means_all() -> None:
    users = UserFactory.create_batch(2)
    assert maintenance.warmup(User, limit=10**30)["stored"] == len(users)


def test_warmup_set_is_hot_rows_then_recent_ones() -> None:
    forget_hot_rows()
    a, b, c, d = UserFactory.create_batch(4)
    redis_tier.client.zadd(
        user_mc().home.hot_key(user_mc().label),
        {str(a.pk): 5, str(b.pk): 9, "junk": 99, str(d.pk + 100): 50},
    )

    pks, how = maintenance.warmup_set(User.objects, 3)

    assert how == {"source": "hot+recent", "hot": 2, "recent": 1}
    assert set(pks) == {a.pk, b.pk, d.pk}
    # "junk" is no pk, skipped; a deleted row's pk is returned but never warmed.
    assert maintenance.hottest_pks(User, 4) == [d.pk + 100, b.pk, a.pk]


def test_cleanup_decays_hot_rows_and_forgets_silent_processes() -> None:
    forget_hot_rows()
    mc = user_mc()
    client = redis_tier.client
    hot_key, procs_key = mc.home.hot_key(mc.label), mc.home.procs_key(mc.label)
    client.zadd(hot_key, {"1": 8, "2": 1})
    client.zadd(procs_key, {"gone:1": time.time() - 3600, "here:2": time.time()})
    maintenance.cleanup([User])  # first run: no decay yet, only the clock starts
    assert client.zscore(hot_key, "2") == 1
    # Two half-lives later: 8 -> 2, 1 -> 0.25 (cold, dropped).
    client.set(mc.home.hot_decay_key(mc.label), repr(time.time() - 2 * maintenance.HOT_HALF_LIFE))

    result = maintenance.cleanup([User])

    assert result["hot_members"] == 1 and result["stale_processes"] == 0
    assert client.zrange(hot_key, 0, -1, withscores=True) == [(b"1", pytest.approx(2.0, 0.01))]
    assert client.ttl(hot_key) > 0
    assert client.zrange(procs_key, 0, -1) == [b"here:2"]


def test_l2_entry_count_counts_the_current_generation_only() -> None:
    users = UserFactory.create_batch(3)
    for u in users:
        read(User.objects, pk=u.pk)
    read(User.objects, email=users[0].email)
    assert dashboard.l2_entry_count(User) == 4
    assert dashboard.l2_entry_counts()["testapp.globalmodel"] == 0
    User.objects.flush_cache()
    assert dashboard.l2_entry_count(User) == 0


def test_resolve_models() -> None:
    assert registry.resolve_models(["testapp.user", "testapp.GlobalModel", "testapp.User"]) == [
        User,
        GlobalModel,
    ]
    with pytest.raises(
        registry.UnknownModel, match=r"cached models: .*testapp\.User, testapp\.Provider"
    ):
        registry.resolve_models(["testapp.PlainFlow"])
    # A model class where a label belongs (task arguments are JSON): said, not a TypeError.
    with pytest.raises(
        registry.UnknownModel, match=r"is not a model label; .* e\.g\. 'demo\.User'"
    ):
        registry.resolve_models([User])  # type: ignore[list-item]
    from tiered_cache import tasks

    with pytest.raises(registry.UnknownModel, match="is not a model label"):
        tasks.warmup(User)  # type: ignore[arg-type]


def test_flush_of_a_model_without_a_cached_manager_names_it() -> None:
    from tests.testapp.models import PlainFlow

    user = UserFactory()
    read(User.objects, pk=user.pk)
    with pytest.raises(registry.UnknownModel, match=r"testapp\.PlainFlow is not cached"):
        maintenance.flush([User, PlainFlow])
    assert len(l2_keys(User)) == 1  # refused before any was flushed


def test_flush_inside_atomic_waits_for_the_commit() -> None:
    from django.db import transaction

    user = UserFactory()
    read(User.objects, pk=user.pk)
    with transaction.atomic():
        assert maintenance.flush([User]) == ["testapp.User"]
        assert len(l2_keys(User)) == 1
    assert l2_keys(User) == []


def test_metrics_endpoint(client: Client) -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    User.objects.get_cached(pk=user.pk)
    tiered_cache.clear_local()
    User.objects.get_cached(pk=user.pk)
    user.save()

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    for line in (
        'tiered_cache_hits_total{model="testapp.user",tier="l1"} 1.0',
        'tiered_cache_hits_total{model="testapp.user",tier="l2"} 1.0',
        'tiered_cache_misses_total{model="testapp.user"} 1.0',
        'tiered_cache_invalidations_total{model="testapp.user"} ',
        'tiered_cache_breaker_state{state="closed"} 1.0',
        'tiered_cache_breaker_state{state="open"} 0.0',
        "tiered_cache_bus_trusted 1.0",
        'tiered_cache_l2_latency_seconds_bucket{le="+Inf"} ',
        'tiered_cache_cluster_hits_total{model="testapp.user",tier="l1"} ',
        'tiered_cache_l1_entries{model="testapp.user"} ',
    ):
        assert line in text, line
    # Scraping twice registers nothing twice.
    assert client.get("/metrics").status_code == 200


def test_signals_for_anyone_else() -> None:
    from tiered_cache.signals import cache_hit, cache_invalidated, cache_miss

    seen: list[tuple[str, Any, dict[str, Any]]] = []

    def receiver(name: str) -> Any:
        def got(sender: Any, **kwargs: Any) -> None:
            seen.append((name, sender, kwargs))

        return got

    receivers = {"hit": receiver("hit"), "miss": receiver("miss"), "inv": receiver("inv")}
    cache_hit.connect(receivers["hit"])
    cache_miss.connect(receivers["miss"])
    cache_invalidated.connect(receivers["inv"])
    try:
        user = UserFactory()
        seen.clear()
        read(User.objects, pk=user.pk)
        User.objects.get_cached(pk=user.pk)
        user.save()
    finally:
        cache_hit.disconnect(receivers["hit"])
        cache_miss.disconnect(receivers["miss"])
        cache_invalidated.disconnect(receivers["inv"])

    assert [(name, sender) for name, sender, _ in seen] == [
        ("miss", User),
        ("hit", User),
        ("inv", User),
    ]
    assert seen[1][2]["tier"] == "l1"
    assert seen[2][2]["flush"] is False
