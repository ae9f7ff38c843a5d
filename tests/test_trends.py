"""The dashboard's trends: reads per minute by tier, added to a capped list per model by the
statistics push (only when there were reads: an idle process sends nothing), the last hour
as a series and as an inline SVG chart; and L2 memory per model from a bounded sample of
MEMORY USAGE. These tests commit."""

from __future__ import annotations

import json
import re
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import Client

from tests.cache_fixtures import l2_keys
from tests.ops_helpers import read
from tests.testapp.factories import FlowFactory, UserFactory
from tests.testapp.models import Flow, User
from tiered_cache import dashboard, reporting
from tiered_cache.counters import hot
from tiered_cache.keys import TREND_FIELDS, trend_call
from tiered_cache.registry import cached_models, first_model_cache
from tiered_cache.tiers import redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]

DASHBOARD = "/admin/tiered_cache/pendinginvalidation/dashboard/"


def trend_key(model: Any) -> str:
    mc = first_model_cache(model)
    assert mc is not None
    return mc.home.trend_key(mc.label)


@pytest.fixture(autouse=True)
def no_trends() -> None:
    """Nothing of earlier tests left to push, and no trend of theirs."""
    reporting.publish_stats()
    hot.take()
    for model in cached_models():
        redis_tier.client.delete(trend_key(model))


def counts(model: Any) -> dict[str, int]:
    """The model's trend summed over its minutes."""
    label = model._meta.label_lower
    rows = reporting.trends([model])[label]
    return {name: sum(r[i + 1] for r in rows) for i, name in enumerate(TREND_FIELDS)}


def add(model: Any, minute: int, *numbers: int, keep: int = reporting.TREND_KEEP) -> Any:
    """Run the trend script as a push does."""
    mc = first_model_cache(model)
    assert mc is not None
    call = trend_call(mc.home, mc.label, minute, numbers, keep, 60_000)
    return redis_tier.client.eval(call.script.source, len(call.keys), *call.keys, *call.args)


# -- the pushes ----------------------------------------------------------------------------


def test_a_push_adds_its_reads_to_their_minute() -> None:
    user = UserFactory()
    for _ in range(5):
        read(User.objects, pk=user.pk)  # a miss, then 4 L1 hits
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=user.pk + 100)
    before = time.time()

    reporting.publish_stats()

    rows = reporting.trends([User])["testapp.user"]
    assert len(rows) == 1
    minute, l1, l2, negative, misses, bypassed = rows[0]
    assert minute in (int(before // 60), int(time.time() // 60))
    assert (l1, l2, negative, misses, bypassed) == (4, 0, 0, 2, 0)

    # A second push in the same minute adds to it (or starts the next one).
    for _ in range(3):
        User.objects.get_cached(pk=user.pk)
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=user.pk + 100)  # remembered
    reporting.publish_stats()
    assert len(reporting.trends([User])["testapp.user"]) in (1, 2)
    assert counts(User) == {
        "l1_hits": 7,
        "l2_hits": 0,
        "negative_hits": 1,
        "misses": 2,
        "bypassed": 0,
    }
    assert 0 < redis_tier.client.pttl(trend_key(User)) <= reporting.TREND_TTL * 1000


def test_a_push_without_reads_adds_no_minute() -> None:
    user = UserFactory()
    user.first_name = "changed"
    user.save()  # an invalidation: counted, pushed, but not a read
    pushed = reporting.publish_stats()
    assert pushed["counters"]["testapp.user"].get("invalidations", 0) >= 1
    assert reporting.trends([User])["testapp.user"] == []
    assert redis_tier.client.exists(trend_key(User)) == 0
    # Nothing new: nothing sent at all.
    assert reporting.publish_stats() == {"counters": {}, "hot": {}}


def test_reads_of_each_model_go_to_its_own_trend() -> None:
    user = UserFactory()
    flow = FlowFactory()
    read(User.objects, pk=user.pk)
    for _ in range(3):
        read(Flow.objects, tenant_id=flow.tenant_id, session_id=flow.session_id)
    reporting.publish_stats()
    assert counts(User)["misses"] == 1 and counts(User)["l1_hits"] == 0
    assert counts(Flow)["misses"] == 1 and counts(Flow)["l1_hits"] == 2


# -- the list ------------------------------------------------------------------------------


def test_the_list_keeps_the_last_minutes_only() -> None:
    for minute in range(1000, 1000 + reporting.TREND_KEEP + 30):
        assert add(User, minute, 1, 0, 0, 0, 0) == 1
    assert redis_tier.client.llen(trend_key(User)) == reporting.TREND_KEEP
    rows = reporting.trends([User])["testapp.user"]
    assert [r[0] for r in rows] == list(range(1030, 1000 + reporting.TREND_KEEP + 30))
    assert 0 < redis_tier.client.pttl(trend_key(User)) <= 60_000


def test_one_element_per_minute_and_a_late_push_joins_the_last() -> None:
    assert add(User, 500, 1, 2, 3, 4, 5) == 1
    assert add(User, 500, 10, 0, 0, 0, 0) == 0
    assert add(User, 499, 100, 0, 0, 0, 0) == 0  # a process whose clock is behind
    assert add(User, 501, 0, 0, 0, 1, 0) == 1
    assert reporting.trends([User])["testapp.user"] == [
        (500, 111, 2, 3, 4, 5),
        (501, 0, 0, 0, 1, 0),
    ]


def test_junk_under_the_key_never_fails_a_push() -> None:
    client = redis_tier.client
    client.set(trend_key(User), "junk")
    assert reporting.trends([User])["testapp.user"] == []
    assert add(User, 600, 1, 0, 0, 0, 0) == 1
    client.rpush(trend_key(User), "not a minute")
    assert reporting.trends([User])["testapp.user"] == [(600, 1, 0, 0, 0, 0)]
    assert add(User, 600, 1, 0, 0, 0, 0) == 1  # the junk element was dropped
    assert client.lrange(trend_key(User), 0, -1) == [b"600 1 0 0 0 0", b"600 1 0 0 0 0"]
    assert reporting.trends([User])["testapp.user"] == [(600, 2, 0, 0, 0, 0)]


# -- the series and the chart -------------------------------------------------------------


def test_the_last_hour_as_a_series() -> None:
    now_minute = 29_000_000
    now = now_minute * 60 + 30.0  # half-way through the current minute
    samples = [
        (now_minute - 90, 999, 0, 0, 0, 0),  # older than the hour: left out
        (now_minute - 2, 54, 0, 0, 6, 0),
        (now_minute, 10, 5, 0, 5, 10),
    ]
    series = dashboard.trend_series(samples, now)
    assert len(series) == 60
    assert series[0]["minute"] == now_minute - 59 and series[-1]["minute"] == now_minute
    assert sum(p["reads"] for p in series) == 60 + 30
    two_ago = series[-3]
    assert two_ago["per_second"] == 1.0 and two_ago["hit_ratio"] == 0.9
    assert two_ago["tiers_per_second"]["L1"] == 0.9
    current = series[-1]
    assert current["seconds"] == 30.0
    assert current["per_second"] == 1.0  # 30 reads in the 30 s it has run
    assert current["hit_ratio"] == 0.75  # bypassed reads count as reads, not in the ratio
    assert current["tiers_per_second"]["bypassed"] == pytest.approx(1 / 3)
    assert series[-2]["reads"] == 0 and series[-2]["hit_ratio"] is None


def test_the_dashboard_draws_the_last_hour(client: Client) -> None:
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    users = UserFactory.create_batch(2)
    for u in users:
        for _ in range(4):
            read(User.objects, pk=u.pk)

    page = client.get(DASHBOARD).content.decode()  # the view pushes this process's counters

    row = re.search(r'<tr id="tc-trend-testapp-user".*?</tr>', page, re.S)
    assert row, "no trend of testapp.User"
    points = re.findall(
        r'<g class="tc-trend-minute" data-minute="(\d\d:\d\d)" '
        r'data-reads-per-second="([\d.]+)" data-hit-ratio="([\d.]*)">',
        row.group(0),
    )
    assert points and float(points[-1][1]) > 0
    reads = sum(int(n) for n in re.findall(r"UTC: (\d+) reads", row.group(0)))
    assert reads >= 8
    assert 'data-tier="L1"' in row.group(0) and 'data-tier="database"' in row.group(0)
    assert "<script" not in page.split('id="tc-trends"')[1].split("</div>")[0]
    assert "reads in the last hour" in row.group(0)
    quiet = re.search(r'<p class="tc-summary" id="tc-trends-quiet">(.*?)</p>', page, re.S)
    assert quiet and "No reads in the last hour" in quiet.group(1)
    assert "testapp.Tenant" in quiet.group(1) and "testapp.User<" not in quiet.group(1)


def test_the_dashboard_without_redis_says_trends_are_unknown(
    client: Client, redis_unreachable: str
) -> None:
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    page = client.get(DASHBOARD).content.decode()
    assert "Trends are unknown while Redis is unavailable." in page
    assert 'class="tc-trend-minute"' not in page


# -- L2 memory ---------------------------------------------------------------------------------


def test_l2_memory_is_a_bounded_sample_scaled_to_the_entries() -> None:
    users = UserFactory.create_batch(40)
    for u in users:
        read(User.objects, pk=u.pk)
    keys = l2_keys(User)
    assert len(keys) == 40
    exact = sum(redis_tier.client.memory_usage(k) for k in keys)

    sizes = dashboard.l2_sizes([User])["testapp.user"]

    assert sizes["entries"] == 40
    # The sample is spread over the model's indexes, one per shard: on a cluster a shard
    # holding fewer entries than its share of the sample measures fewer.
    shards = len(first_model_cache(User).home.shards)  # type: ignore[union-attr]
    if shards == 1:
        assert sizes["sampled"] == dashboard.MEMORY_SAMPLE
    else:
        assert 0 < sizes["sampled"] <= dashboard.MEMORY_SAMPLE
    # Entries differ by a few bytes only: the estimate is close to their sum, plus indexes.
    assert 0.9 * exact <= sizes["bytes"] <= 1.1 * exact + 20_000
    assert dashboard.l2_sizes([Flow])["testapp.flow"] == {"entries": 0, "bytes": 0, "sampled": 0}


def test_stats_json_carries_l2_memory() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    out = StringIO()
    call_command("tiered_cache", "stats", "testapp.User", "--json", stdout=out)
    row = json.loads(out.getvalue())["models"]["testapp.User"]
    assert row["l2_entries"] == 1 and row["l2_bytes"] > 100
