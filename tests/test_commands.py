"""`manage.py tiered_cache stats|flush|warmup|cleanup`: every subcommand and its errors,
checked against what the cache really holds afterwards. These tests commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

import tiered_cache
from tests.cache_fixtures import l2_keys, plant
from tests.ops_helpers import change_behind_the_cache, pk_of_key, read, read_cached
from tests.testapp.factories import GlobalModelFactory, UserFactory
from tests.testapp.models import GlobalModel, User
from tiered_cache import maintenance, reporting
from tiered_cache.breaker import breaker
from tiered_cache.conf import conf
from tiered_cache.registry import first_model_cache
from tiered_cache.tiers import redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    out = StringIO()
    call_command("tiered_cache", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# -- stats -----------------------------------------------------------------------


def test_stats_lists_every_cached_model_with_lookups_and_sizes() -> None:
    user = UserFactory()
    for _ in range(3):
        read(User.objects, pk=user.pk)
    read(User.objects, email=user.email)

    out = run("stats")

    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "lookups", "L1", "L2"]
    for label in (
        "testapp.User",
        "testapp.Provider",
        "testapp.GlobalModel",
        "testapp.ProviderModel",
        "testapp.Flow",
    ):
        assert any(line.startswith(label + " ") for line in lines), out
    user_line = next(line for line in lines if line.startswith("testapp.User "))
    assert "pk, email" in user_line
    assert "testapp.PlainFlow" not in out
    assert lines[-1].startswith("breaker closed, bus ")


def test_stats_json_counts_reads_of_all_processes() -> None:
    user = UserFactory()
    for _ in range(4):
        read(User.objects, pk=user.pk)  # 1 miss, then L1 hits

    data = json.loads(run("stats", "testapp.User", "--json"))

    assert list(data["models"]) == ["testapp.User"]
    row = data["models"]["testapp.User"]
    assert row["lookups"] == ["pk", "email"]
    assert row["scope"] == "all processes"
    assert row["misses"] >= 1 and row["l1_hits"] >= 3
    assert row["tiers"]["L1"] == row["l1_hits"] and row["tiers"]["database"] == row["misses"]
    assert row["l1_entries"] == 1
    assert row["l2_entries"] == 1
    assert data["redis_error"] is None
    assert data["breaker"] == "closed"


def test_stats_without_redis_falls_back_to_this_process() -> None:
    for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
        breaker.failure()

    data = json.loads(run("stats", "testapp.User", "--json"))

    assert data["redis_error"] == "circuit open"
    assert data["breaker"] == "open"
    assert data["models"]["testapp.User"]["scope"] == "this process"
    assert data["models"]["testapp.User"]["l2_entries"] is None


# -- flush -------------------------------------------------------------------------


def test_flush_one_model_drops_its_entries_only() -> None:
    user = UserFactory(first_name="old")
    gm = GlobalModelFactory()
    read(User.objects, pk=user.pk)
    read(GlobalModel.objects, name=gm.name)
    change_behind_the_cache(user, "new")
    assert read_cached(User.objects, pk=user.pk).first_name == "old"

    out = run("flush", "testapp.User")

    assert out.strip() == "Flushed every testapp.User entry (all processes)."
    assert User.objects.get_cached(pk=user.pk).first_name == "new"
    tiered_cache.clear_local()
    assert len(l2_keys(GlobalModel)) == 1, "another model's entries were dropped"


def test_flush_all() -> None:
    user = UserFactory(first_name="old")
    gm = GlobalModelFactory()
    read(User.objects, pk=user.pk)
    read(GlobalModel.objects, name=gm.name)

    out = run("flush", "--all")

    assert "Flushed every testapp.User entry" in out
    assert "Flushed every testapp.GlobalModel entry" in out
    assert l2_keys(User) == [] and l2_keys(GlobalModel) == []


def test_flush_needs_models_or_all() -> None:
    with pytest.raises(CommandError, match=r"Name the models to flush .* or pass --all"):
        run("flush")
    with pytest.raises(CommandError, match="not both"):
        run("flush", "--all", "testapp.User")


@pytest.mark.parametrize("action", ["stats", "flush", "warmup", "cleanup"])
@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("testapp.Nope", r"'testapp\.Nope': no such model is installed"),
        ("nope.User", r"'nope\.User': no such model is installed"),
        ("User", r"'User' is not a model label; use app_label\.ModelName"),
        ("testapp.PlainFlow", r"testapp\.PlainFlow is not cached"),
        ("auth.Group", r"auth\.Group is not cached"),
    ],
)
def test_unknown_or_uncached_model_is_an_error(action: str, label: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(action, label)


def test_model_labels_are_case_insensitive() -> None:
    assert (
        run("flush", "testapp.user").strip() == "Flushed every testapp.User entry (all processes)."
    )


def test_error_exits_non_zero_from_the_command_line() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    proc = subprocess.run(
        [sys.executable, "manage.py", "tiered_cache", "warmup", "testapp.Nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CommandError: 'testapp.Nope': no such model is installed" in proc.stderr


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(CommandError, match="invalid choice: 'purge'"):
        run("purge")


# -- warmup --------------------------------------------------------------------------


def test_warmup_with_limit_fills_l2_with_the_most_recent_rows() -> None:
    users = UserFactory.create_batch(5)

    out = run("warmup", "testapp.User", "--limit", "3")

    assert out.startswith("testapp.User: stored 3, refused 0 (hot+recent)")
    keys = l2_keys(User)
    assert sorted(pk_of_key(k) for k in keys) == sorted(u.pk for u in users[-3:])
    # Warmed entries are served from L2: no database read.
    mc = first_model_cache(User)
    assert mc is not None
    misses = mc.counters.misses
    User.objects.get_cached(pk=users[-1].pk)
    assert mc.counters.misses == misses


def test_warmup_prefers_the_hottest_rows() -> None:
    old, *_ = UserFactory.create_batch(4)
    for _ in range(64):
        User.objects.get_cached(pk=old.pk)  # sampled as hot
    reporting.publish_stats()
    tiered_cache.clear_local()
    run("flush", "testapp.User")

    out = run("warmup", "testapp.User", "--limit", "1")

    assert "stored 1" in out
    assert [pk_of_key(k) for k in l2_keys(User)] == [old.pk]


def test_warmup_without_models_warms_every_cached_model() -> None:
    UserFactory.create_batch(2)
    GlobalModelFactory.create_batch(2)

    out = run("warmup")

    assert "testapp.User: stored 2" in out
    assert "testapp.GlobalModel: stored 2" in out
    assert "testapp.Flow: stored 0" in out
    assert maintenance.last_runs()["warmup"]["testapp.user"]["stored"] == 2


def test_warmup_rejects_a_negative_limit() -> None:
    with pytest.raises(CommandError, match="--limit must be zero or more"):
        run("warmup", "testapp.User", "--limit", "-1")
    with pytest.raises(CommandError, match="invalid int value"):
        run("warmup", "testapp.User", "--limit", "many")


def test_warmup_while_redis_is_unavailable_is_an_error() -> None:
    UserFactory()
    for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
        breaker.failure()
    with pytest.raises(CommandError, match="Redis is unavailable: circuit open"):
        run("warmup", "testapp.User")


# -- cleanup ---------------------------------------------------------------------------


def test_cleanup_deletes_only_what_can_no_longer_be_served() -> None:
    client = redis_tier.client
    mc = first_model_cache(User)
    assert mc is not None
    gone_user, stale_user, live_user = UserFactory.create_batch(3)
    read(User.objects, pk=gone_user.pk)
    run("flush", "testapp.User")  # its entry is now of an old generation
    old_generation = [mc.key(mc.pk_lookup, (gone_user.pk,))]
    assert client.exists(*old_generation)
    for u in (stale_user, live_user):
        read(User.objects, pk=u.pk)
        read(User.objects, email=u.email)
    User.objects.invalidate(stale_user)  # its email entry stays behind, unservable
    old_schema = [
        f"{mc.home.tag}:0123456789:{mc.label}:objects:pk:default:3.i42",
        f"{mc.home.tag}:{mc.schema}:{mc.label}:gone:pk:default:1",
    ]
    # As an earlier deploy's fills left them: listed in the model's index of the generation.
    index = mc.home.index_key(mc.label, client.get(mc.home.gen_key))
    for key in old_schema:
        client.set(key, b"P|x|y|z|payload")
        client.zadd(index, {key: (time.time() + 60) * 1000})
    client.sadd(mc.home.indexes_key, index)

    out = run("cleanup")

    assert out.startswith("Scanned ")
    for key in [*old_generation, *old_schema]:
        assert not client.exists(key), key
    live = {k.decode() for k in l2_keys(User)}
    email = mc.lookups[frozenset({"email"})]
    assert live == {
        mc.key(mc.pk_lookup, (live_user.pk,)),
        mc.key(email, (live_user.email,)),
    }
    assert client.exists(mc.home.gen_key) and client.exists(mc.home.writes_key)
    assert not client.exists(mc.key(email, (stale_user.email,)))
    last = maintenance.last_runs()["cleanup"]
    assert last["old_schema"] >= 2 and last["old_generation"] >= 1 and last["stale_rows"] >= 1
    # What cleanup kept is still served from L2.
    tiered_cache.clear_local()
    misses = mc.counters.misses
    assert User.objects.get_cached(email=live_user.email) == live_user
    assert mc.counters.misses == misses


def test_cleanup_of_one_model_leaves_the_others_alone() -> None:
    client = redis_tier.client
    user_mc, gm_mc = first_model_cache(User), first_model_cache(GlobalModel)
    assert user_mc is not None and gm_mc is not None
    junk = [
        f"{user_mc.home.tag}:0123456789:{user_mc.label}:objects:pk:default:1",
        f"{gm_mc.home.tag}:0123456789:{gm_mc.label}:objects:pk:default:1",
    ]
    for mc, key in zip((user_mc, gm_mc), junk, strict=True):
        plant(mc, key)

    run("cleanup", "testapp.GlobalModel")

    assert client.exists(junk[0]) and not client.exists(junk[1])
    run("cleanup")
    assert not client.exists(junk[0])


def test_settings_prefix_isolates_this_run() -> None:
    # Everything these tests write sits under the run's prefix, which conftest deletes.
    assert conf.KEY_PREFIX == settings.TEST_KEY_PREFIX
