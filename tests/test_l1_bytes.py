"""L1 bounded in bytes as well as in entries (L1_MAX_BYTES; issue 13's memory row): rows
with large JSON values cannot make a process hold L1_MAX_ENTRIES times their size."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

import tiered_cache
from tests.cache_fixtures import counters
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.tiers import local_tier, redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024


def test_large_rows_keep_l1_under_its_byte_bound(settings: Any) -> None:
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "L1_MAX_BYTES": 4 * MB}
    flows = [FlowFactory(context={"blob": f"{i}" * 500_000}) for i in range(40)]
    tiered_cache.clear_local()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for f in flows:
        got = Flow.objects.get_cached(pk=f.pk)
        assert got.context == f.context
    redis_tier.wait_for_fills()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"\n[l1-bytes] 40 rows of 0.5 MB, bound 4 MB: {len(local_tier)} entries kept, "
        f"{local_tier.bytes / MB:.2f} MB by weight, {held / MB:.2f} MB traced"
    )
    assert 0 < local_tier.bytes <= 4 * MB
    assert 1 <= len(local_tier) <= 8
    assert local_tier.evictions > 0
    # The weight is the memory: what stays allocated is about what L1 counts.
    assert held <= 2 * 4 * MB
    # The entries kept are the last ones read, and serve hits.
    before_hits = counters(Flow)["l1_hits"]
    assert Flow.objects.get_cached(pk=flows[-1].pk).context == flows[-1].context
    assert counters(Flow)["l1_hits"] == before_hits + 1


def test_a_row_heavier_than_the_bound_is_served_from_l2_not_kept_in_l1(settings: Any) -> None:
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "L1_MAX_BYTES": 100_000}
    f = FlowFactory(context={"blob": "y" * 500_000})
    tiered_cache.clear_local()
    assert Flow.objects.get_cached(pk=f.pk).context == f.context
    redis_tier.wait_for_fills()
    assert len(local_tier) == 0 and local_tier.bytes == 0
    before = counters(Flow)["l2_hits"]
    assert Flow.objects.get_cached(pk=f.pk).context == f.context
    assert counters(Flow)["l2_hits"] == before + 1


def test_dropping_rows_gives_their_bytes_back() -> None:
    flows = [FlowFactory(context={"blob": "z" * 10_000}) for _ in range(5)]
    tiered_cache.clear_local()
    for f in flows:
        Flow.objects.get_cached(pk=f.pk)
    assert local_tier.bytes > 5 * 10_000
    for f in flows:
        f.current_step += 1
        f.save()
    assert len(local_tier) == 0 and local_tier.bytes == 0


def test_an_oversized_row_does_not_push_the_other_entries_out(settings: Any) -> None:
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "L1_MAX_BYTES": 200_000}
    small = [FlowFactory() for _ in range(10)]
    big = FlowFactory(context={"blob": "w" * 500_000})
    tiered_cache.clear_local()
    for f in small:
        Flow.objects.get_cached(pk=f.pk)
    kept = len(local_tier)
    assert kept == 10
    assert Flow.objects.get_cached(pk=big.pk).context == big.context
    assert len(local_tier) == kept
