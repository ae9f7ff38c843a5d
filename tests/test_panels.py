"""The debug-toolbar panel (tiered_cache.panels) and what it shows (tiered_cache.recording):
each read's tier, and why it bypassed the tiers or read the database; its invalidations;
only the recording request's reads, its async ones included. The panel in a real toolbar
and browser: tests/test_panels_browser.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import HttpRequest, HttpResponse

import tiered_cache
from tests.ops_helpers import read_cached
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import cached, recording
from tiered_cache.breaker import OPEN, breaker
from tiered_cache.bus import bus
from tiered_cache.panels import TieredCachePanel
from tiered_cache.tiers import redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]


@pytest.fixture
def rec() -> Iterator[recording.Recorder]:
    """Record this test's reads, as a panel records a request's."""
    r = recording.Recorder()
    token = recording.start(r)
    yield r
    recording.stop(token)


def rows(r: recording.Recorder) -> list[tuple[str, str, str]]:
    """(api, tier, reason) of each recorded call."""
    return [(c["api"], c["tier"], c["reason"]) for c in map(recording.Call.as_dict, r.calls)]


def filled(user: User) -> None:
    """The user in both tiers: read once (a miss), its L2 fill landed."""
    read_cached(User.objects, pk=user.pk)
    redis_tier.wait_for_fills()


def test_nothing_is_recorded_and_nothing_is_active_without_a_panel() -> None:
    user = UserFactory()
    assert recording.active == 0
    User.objects.get_cached(pk=user.pk)
    assert recording.current() is None
    r = recording.Recorder()
    recording.stop(recording.start(r))
    assert recording.active == 0 and r.calls == []


def test_l1_l2_and_database_tiers(rec: recording.Recorder) -> None:
    user = UserFactory()
    read_cached(User.objects, pk=user.pk)  # a miss (read_cached may retry a lapse)
    redis_tier.wait_for_fills()
    rec.clear()
    read_cached(User.objects, pk=user.pk)
    tiered_cache.clear_local()
    read_cached(User.objects, email=user.email)  # not filled under this lookup yet
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    read_cached(User.objects, pk=user.pk)
    assert rows(rec) == [
        ("get_cached", "L1", ""),
        ("get_cached", "database", ""),
        ("get_cached", "L2", ""),
    ]
    calls = [c.as_dict() for c in rec.calls]
    assert [c["lookup"] for c in calls] == [
        f"pk={user.pk}",
        f"email={user.email!r}",
        f"pk={user.pk}",
    ]
    assert all(c["model"] == "testapp.user" and c["result"] == "found" for c in calls)
    # Who called: the first frame outside tiered_cache and Django.
    assert all(c["ms"] > 0 and " in trusted_read" in c["where"] for c in calls)
    assert rec.reads == 3
    assert rec.totals == {"L1": 1, "L2": 1, "negative": 0, "database": 1, "bypassed": 0}


def test_remembered_absence_from_l1_and_l2(rec: recording.Recorder) -> None:
    for _ in range(3):
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(pk=10**9)
        redis_tier.wait_for_fills()
        if len(rec.calls) == 2:
            tiered_cache.clear_local()
    assert rows(rec) == [
        ("get_cached", "database", ""),
        ("get_cached", "negative", "from L1"),
        ("get_cached", "negative", "from L2"),
    ]
    assert {c.result for c in rec.calls} == {"does not exist"}


def test_bypassed_in_a_transaction_that_wrote_the_model(rec: recording.Recorder) -> None:
    user = UserFactory()
    filled(user)
    rec.clear()
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(first_name="new")
        assert User.objects.get_cached(pk=user.pk).first_name == "new"
        assert User.objects.get_many_cached([user.pk, 10**9]).keys() == {user.pk}
    assert rows(rec) == [
        ("get_cached", "bypassed", "written in this transaction"),
        ("get_many_cached", "bypassed 2", "written in this transaction"),
    ]


@pytest.mark.django_db(transaction=True, databases=["default", "snapshot"])
def test_bypassed_in_a_snapshot_transaction(rec: recording.Recorder) -> None:
    user = UserFactory()
    snap = User.objects.db_manager("snapshot")
    rec.clear()
    with transaction.atomic(using="snapshot"):
        assert snap.get_cached(pk=user.pk) == user
    assert rows(rec) == [("get_cached", "bypassed", "snapshot isolation")]


def test_bus_not_trusted_reads_the_database(
    rec: recording.Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = UserFactory()
    filled(user)
    tiered_cache.clear_local()
    rec.clear()
    monkeypatch.setattr(bus, "trusted", lambda: False)
    monkeypatch.setattr(bus, "ensure_started", lambda wait=None: None)
    User.objects.get_cached(pk=user.pk)
    User.objects.get_many_cached([user.pk])
    reason = "bus not trusted"
    assert rows(rec) == [
        ("get_cached", "database", reason),
        ("get_many_cached", "database 1", reason),
    ]


def test_breaker_open_reads_the_database(rec: recording.Recorder) -> None:
    user = UserFactory()
    filled(user)
    tiered_cache.clear_local()
    rec.clear()
    breaker.state, breaker._opened_at = OPEN, time.monotonic()  # reset by clean_cache
    User.objects.get_cached(pk=user.pk)
    tiered_cache.clear_local()  # the row went to L1: the bus still vouches for it
    User.objects.get_many_cached([user.pk])
    reason = "Redis unavailable (circuit open)"
    assert rows(rec) == [
        ("get_cached", "database", reason),
        ("get_many_cached", "database 1", reason),
    ]


def test_get_many_counts_each_tier(rec: recording.Recorder) -> None:
    a, b, c = UserFactory.create_batch(3)
    filled(a)
    filled(b)
    tiered_cache.clear_local()
    read_cached(User.objects, pk=a.pk)
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=10**9)
    redis_tier.wait_for_fills()
    rec.clear()
    found = User.objects.get_many_cached([a.pk, b.pk, c.pk, 10**9, str(a.pk)])
    assert found.keys() == {a.pk, b.pk, c.pk}
    (call,) = [x.as_dict() for x in rec.calls]
    assert call["api"] == "get_many_cached"
    assert call["counts"] == {"L1": 1, "negative": 1, "L2": 1, "database": 1}
    assert call["tier"] == "L1 1, negative 1, L2 1, database 1"
    assert call["lookup"] == f"pk in [{a.pk}, {b.pk}, {c.pk}, {10**9}, {str(a.pk)!r}]"
    assert call["result"] == "3 rows"
    assert rec.reads == 4


def test_related_manager_reads_it_cannot_check_are_bypassed(rec: recording.Recorder) -> None:
    from tests.testapp.models import Item, Label, Owner

    label = Label.objects.create(name="red")
    item = Item.objects.create(name="pen", owner_cascade=Owner.objects.create(name="o"))
    item.tags.add(label)
    rec.clear()
    assert label.items.get_cached(pk=item.pk) == item
    assert label.items.get_many_cached([item.pk]) == {item.pk: item}
    reason = "a relation the cached row cannot check (many-to-many, generic)"
    assert rows(rec) == [
        ("get_cached", "bypassed", reason),
        ("get_many_cached", "bypassed 1", reason),
    ]


# -- cached functions ---------------------------------------------------------------------


@pytest.fixture
def names() -> Iterator[Any]:
    @cached(depends_on=[User])
    def user_names(domain: str) -> list[str]:
        # A cached read inside the computation: recorded as its own call, nested.
        User.objects.get_cached(pk=User.objects.order_by("pk")[0].pk)
        return sorted(
            User.objects.filter(email__endswith="@" + domain).values_list("username", flat=True)
        )

    yield user_names
    user_names.unregister()


def test_cached_function_tiers(rec: recording.Recorder, names: Any) -> None:
    UserFactory(username="ann", email="ann@x.test")
    for _ in range(3):
        assert names("x.test") == ["ann"]
        if len(rec.calls) == 3:  # the first call and the read nested in it, then an L1 hit
            tiered_cache.clear_local()
    with transaction.atomic():
        UserFactory(username="bob", email="bob@x.test")
        assert names("x.test") == ["ann", "bob"]
    got = [
        (c["api"], c["tier"], c["reason"], c["depth"])
        for c in map(recording.Call.as_dict, rec.calls)
    ]
    assert [g[:2] for g in got] == [
        ("cached function", "database"),
        ("get_cached", "database"),
        ("cached function", "L1"),
        ("cached function", "L2"),
        ("cached function", "bypassed"),
        ("get_cached", "bypassed"),
    ]
    assert [g[3] for g in got] == [0, 1, 0, 0, 0, 1]
    assert got[0][2] == "computed" and got[4][2] == "written in this transaction"
    assert rec.calls[0].label == "fn:" + names.qualname
    assert rec.calls[0].lookup == "'x.test'"
    assert rec.calls[0].result == "list"


# -- async: recorded as the request's, on the loop and in sync_to_async's thread ------------


@pytest.mark.asyncio
async def test_async_reads_are_attributed_to_the_request(rec: recording.Recorder) -> None:
    user = await sync_to_async(UserFactory)()
    await User.objects.aget_cached(pk=user.pk)  # a miss: read in sync_to_async's thread
    await sync_to_async(redis_tier.wait_for_fills)()
    await User.objects.aget_cached(pk=user.pk)  # an L1 hit on the loop
    with pytest.raises(User.DoesNotExist):
        await User.objects.aget_cached(pk=10**9)
    await User.objects.aget_many_cached([user.pk, 10**9])
    await asyncio_gather_reads(user)
    assert rows(rec)[:4] == [
        ("aget_cached", "database", ""),
        ("aget_cached", "L1", ""),
        ("aget_cached", "database", ""),
        ("aget_many_cached", "L1 1, negative 1", "from L1"),
    ]
    assert rows(rec)[4:] == [("aget_cached", "L1", "")] * 2
    assert all(c.depth == 0 for c in rec.calls)


async def asyncio_gather_reads(user: User) -> None:
    import asyncio

    await asyncio.gather(User.objects.aget_cached(pk=user.pk), User.objects.aget_cached(pk=user.pk))


def test_other_threads_are_not_recorded(rec: recording.Recorder) -> None:
    user = UserFactory()
    filled(user)
    rec.clear()
    t = threading.Thread(target=lambda: User.objects.get_cached(pk=user.pk))
    t.start()
    t.join()
    assert recording.active == 1 and rec.calls == []
    User.objects.get_cached(pk=user.pk)
    assert len(rec.calls) == 1


# -- invalidations --------------------------------------------------------------------------


def test_invalidations_the_request_issued(rec: recording.Recorder, names: Any) -> None:
    user = UserFactory()
    rec.clear()
    user.first_name = "x"
    user.save()
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(last_name="y")
        assert rec.invalidations[1:] == []  # sent at the commit
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(last_name="z")
        transaction.set_rollback(True)
    User.objects.flush_cache()
    names.invalidate("x.test")
    got = [(i["models"], i["rows"], i["flush"], bool(i["derived_key"])) for i in rec.invalidations]
    # The proxy CachedUser shares the table, and so its cache group.
    models = ["testapp.user", "testapp.cacheduser"]
    assert got == [
        (models, [str(user.pk)], False, False),
        (models, [str(user.pk)], False, False),
        (models, [], True, False),
        (["fn:" + names.qualname], [], False, True),
    ]
    assert all(i["where"].startswith("tests/test_panels.py:") for i in rec.invalidations)


# -- the panel --------------------------------------------------------------------------------


class _Store:
    @classmethod
    def save_panel(cls, request_id: str, panel_id: str, data: Any) -> None:
        pass


def _toolbar() -> Any:
    return SimpleNamespace(stats={}, store=_Store, request_id="r1", request=HttpRequest())


def test_the_panel_records_its_request_and_renders(names: Any) -> None:
    user = UserFactory()
    filled(user)
    panel = TieredCachePanel(_toolbar(), lambda request: HttpResponse())
    panel.enable_instrumentation()
    try:
        assert recording.active == 1
        User.objects.get_cached(pk=user.pk)
        User.objects.get_cached(pk=user.pk)
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(email="nobody@example.com")
        user.save()
    finally:
        panel.disable_instrumentation()
    assert recording.active == 0
    User.objects.get_cached(pk=user.pk)  # after the request: not its read
    panel.generate_stats(HttpRequest(), HttpResponse())
    assert panel.nav_subtitle == "3 reads, 2 L1, 1 db, 1 invalidation"
    html = panel.content
    assert html.count('class="tc-call"') == 3
    assert html.count('class="tc-invalidation"') == 1
    assert "nobody@example.com" in html and "testapp.user" in html
    panel.disable_instrumentation()  # idempotent
    assert recording.active == 0


def test_the_panel_says_when_nothing_happened() -> None:
    panel = TieredCachePanel(_toolbar(), lambda request: HttpResponse())
    panel.enable_instrumentation()
    panel.disable_instrumentation()
    panel.generate_stats(HttpRequest(), HttpResponse())
    assert panel.nav_subtitle == "0 reads"
    assert "No cached reads in this request." in panel.content
    assert "This request invalidated nothing." in panel.content


# -- the demo's tour pages (here without the toolbar: the suite runs without it) -------------


@pytest.mark.urls("demo_project.urls")
def test_the_demo_tour_pages_read_through_the_cache(client: Any) -> None:
    from demo_project.demo.factories import FlowInstanceFactory, ModelFactory
    from demo_project.demo.factories import UserFactory as DemoUserFactory

    assert client.get("/tour/").status_code == 200  # no data yet
    DemoUserFactory.create_batch(2)
    ModelFactory()
    FlowInstanceFactory()
    r = recording.Recorder()
    token = recording.start(r)
    try:
        for path in ("/tour/", "/tour/?touch=1", "/async/tour/"):
            response = client.get(path)
            assert response.status_code == 200 and b"does not exist" in response.content
    finally:
        recording.stop(token)
    assert [c.api for c in r.calls].count("get_cached") == 2 * 4
    assert [c.api for c in r.calls][-4:] == [
        "aget_cached",
        "aget_cached",
        "aget_many_cached",
        "cached function",
    ]
    assert [i["models"] for i in r.invalidations] == [["demo.user"]]
