"""`python -m benchmarks.bench` (or `make bench`): the targets of issue 7, measured side by side.

Against real PostgreSQL and Redis: the bench recreates its own database (tiered_cache_bench,
dropped again at the end) and uses its own Redis key prefix (deleted at the end). It fills
the database with demo rows: 2,000 users made by UserFactory, copied in SQL (same shapes,
numbered on as the factory numbers them) up to the 111,000 the memory rows need, and flows
made by the flow factories. Then it measures every case in rounds: each round runs every
case once, in a shuffled order, so the machine's noise hits all of them alike; a warm-up
round is not counted. A case's figure is the median over rounds of its mean time per
operation in that round; a ratio is the median over rounds of the two cases' ratio within
a round. Objects made by the setup are frozen (gc.freeze) so the collector does not walk
them inside the timed loops. Each cached case checks, by the cache's own counters, that it
read the tier it names; a row marked * did not always (the bus lost trust meanwhile).

    python -m benchmarks.bench                 # full run, about 2 minutes
    python -m benchmarks.bench --quick         # a smoke run: few rounds, L1 memory at 10,000 only
    python -m benchmarks.bench --json out.json
    python -m benchmarks.bench --profile       # cProfile of the hot paths instead of the table

A missed target is reported, never an error: the exit status is 1 only when something
failed (a service down, an exception).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import math
import os
import pickle
import platform
import queue
import random
import secrets
import statistics
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_DB = "tiered_cache_bench"

# Operations per case per round in a full run (--quick runs a tenth): about 10-40 ms each.
OPS = {
    "orm_pk": 40,
    "l1_pk": 4000,
    "from_db": 4000,
    "floor_l1": 4000,
    "l2_pk": 100,
    "redis_get": 100,
    "floor_script": 100,
    "floor_l2": 100,
    "miss_pk": 40,
    "orm_cold": 40,
    "floor_miss": 40,
    "floor_miss_fill": 40,
    "neg_l1": 4000,
    "neg_l2": 100,
    "orm_email": 40,
    "l1_email": 4000,
    "l2_email": 100,
    "orm_flow": 40,
    "l1_flow": 4000,
    "l2_flow": 100,
    "in_bulk": 10,
    "floor_many": 10,
    "floor_many_l1": 40,
    "many_l2": 10,
    "many_l1": 40,
    "l1_big": 20,
    "copy_big": 20,
    "save_plain": 20,
    "save_cached": 20,
    "floor_save": 20,
    "floor_save_scripts": 20,
    "breaker": 40,
}
NS = 1_000.0  # nanoseconds per microsecond

# -- configuration ------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int  # measured rounds; one more warm-up round runs first and is not counted
    scale: float  # multiplies every case's operations per round
    user_pool: int  # users made by UserFactory; the rest are copies of them made in SQL
    memory_sizes: tuple[int, ...]
    latency_samples: int
    hot: int = 100  # distinct rows the hit cases cycle over

    def ops(self, case_id: str) -> int:
        """Operations of one case in one round."""
        return max(2, int(OPS[case_id] * self.scale))


FULL = Plan(
    rounds=31, scale=1.0, user_pool=2000, memory_sizes=(10_000, 100_000), latency_samples=300
)
QUICK = Plan(rounds=3, scale=0.1, user_pool=300, memory_sizes=(10_000,), latency_samples=30)


def configure_django(
    db_name: str, settings_module: str = "benchmarks.bench_settings", prefix: str | None = None
) -> str:
    """Point Django at the bench settings; returns the Redis key prefix of this run (a new
    one unless `prefix` is given)."""
    if "bench" not in db_name:
        raise SystemExit(
            f"refusing to use database {db_name!r}: its name must contain 'bench' "
            "(the bench drops and recreates it)"
        )
    prefix = prefix or f"tc-bench-{os.getpid()}-{secrets.token_hex(3)}"
    os.environ["TC_BENCH_DB"] = db_name
    os.environ["TC_TEST_KEY_PREFIX"] = prefix
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    import django

    django.setup()
    return prefix


def open_rows(mc: Any, keys: list[str], raws: list[bytes]) -> None:
    """What any authenticated read of a stored row must do after its round trip: check the
    MAC, decode the row, build the caller's instance (thaw: from_db without __init__)."""
    from tiered_cache.keys import RowHeader
    from tiered_cache.serialization import open_signed

    thaw, decode = mc.codec.thaw, mc.codec.decode
    for key, raw in zip(keys, raws, strict=True):
        _, body = open_signed(key, raw, RowHeader)
        thaw(decode(body), "default")


def _maintenance_connection() -> Any:
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    return psycopg.connect(
        host=db.get("HOST") or "127.0.0.1",
        port=db.get("PORT") or 5432,
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )


def recreate_database(create: bool = True) -> None:
    from django.conf import settings
    from django.db import connections
    from psycopg import sql

    name = settings.DATABASES["default"]["NAME"]
    connections.close_all()
    with _maintenance_connection() as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    if create:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)


def delete_redis_keys(prefix: str) -> int:
    import redis
    from django.conf import settings

    # A client of its own with a patient timeout: the cache's 0.25 s is too short for
    # UNLINKing 5,000 keys at a time on a loaded machine.
    client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"], socket_timeout=30)
    n, batch = 0, []
    for key in client.scan_iter(match=f"*{prefix}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch.clear()
    if batch:
        n += client.unlink(*batch)
    return n


def _delete_keys_quietly(prefix: str) -> None:
    try:
        delete_redis_keys(prefix)
    except Exception:
        pass


# -- demo data ------------------------------------------------------------------------------


@dataclass
class Data:
    users: list[int]  # every user pk, in id order
    hot: list[int]  # rows the hit cases cycle over
    hot_emails: list[str]
    hot_values: list[list[Any]]  # the hot rows as Model.from_db takes them
    many: list[int]  # the 100 rows of get_many_cached / in_bulk
    cold: list[int]  # never read before their one miss
    cold_orm: list[int]  # never read before their one ORM get (the miss's baseline)
    cold_floor: list[int]  # never read before the miss's floor case reads them
    cold_fill: list[int]  # never read before the miss's floor with a fill reads them
    memory: list[list[int]]  # disjoint sets of users for the L1 memory rows
    absent: list[int]  # pks with no row (negative hits)
    flows: list[tuple[str, str]]  # (tenant_id, session_id) of hot flows
    save_cached: list[Any]  # FlowInstance rows the save case writes
    save_plain: list[Any]  # PlainFlowInstance twins
    big: int  # a user whose JSON field holds 5 MB (the L1 hit of a large row)


def make_data(plan: Plan, cold_needed: int) -> Data:
    from django.db import connection

    from demo_project.demo.factories import (
        FlowInstanceFactory,
        PlainFlowInstanceFactory,
        UserFactory,
    )
    from demo_project.demo.models import FlowInstance, PlainFlowInstance, User

    total = plan.hot + 100 + 4 * cold_needed + sum(plan.memory_sizes) + 100
    UserFactory.reset_sequence(0)
    pool = UserFactory.build_batch(min(plan.user_pool, total))
    User.objects.bulk_create(pool, batch_size=1000)
    names = list(User.objects.order_by("id").values_list("username", flat=True))
    assert names == [f"user{i:05d}" for i in range(len(pool))], "factory sequence not at 0"
    if total > len(pool):
        # Copies of the factory's rows, numbered on as the factory numbers them: the same
        # shape and value mix at a fraction of the cost (the factory takes ~0.4 ms a user).
        table = User._meta.db_table
        cols = [f.column for f in User._meta.concrete_fields if not f.primary_key]
        n = "(g * %(pool)s + u.rn)::text"
        name = f"'user' || lpad({n}, greatest(5, length({n})), '0')"
        exprs = []
        for c in cols:
            if c == "username":
                exprs.append(name)
            elif c == "email":
                exprs.append(f"{name} || '@example.com'")
            else:
                exprs.append(f'u."{c}"')
        with connection.cursor() as cur:
            cur.execute(
                f'INSERT INTO "{table}" ({", ".join(f"{chr(34)}{c}{chr(34)}" for c in cols)}) '
                f"SELECT {', '.join(exprs)} FROM "
                f'(SELECT *, row_number() OVER (ORDER BY id) - 1 AS rn FROM "{table}") u '
                "CROSS JOIN generate_series(1, %(copies)s) g "
                "WHERE g * %(pool)s + u.rn < %(total)s",
                {"pool": len(pool), "copies": math.ceil(total / len(pool)), "total": total},
            )
            cur.execute(f'ANALYZE "{table}"')
    # Raw SQL is ours to invalidate (nothing is cached yet, but say so anyway).
    User.objects.flush_cache()
    users = list(User.objects.order_by("id").values_list("id", flat=True))
    assert len(users) >= total, (len(users), total)

    it = iter(users)

    def take(n: int) -> list[int]:
        return [next(it) for _ in range(n)]

    hot = take(plan.hot)
    many = take(100)
    cold = take(cold_needed)
    cold_orm = take(cold_needed)
    cold_floor = take(cold_needed)
    cold_fill = take(cold_needed)
    memory = [take(n) for n in plan.memory_sizes]
    by_pk = User.objects.in_bulk(hot)
    concrete = User._meta.concrete_fields
    hot_values = [[getattr(by_pk[pk], f.attname) for f in concrete] for pk in hot]
    hot_emails = [by_pk[pk].email for pk in hot]

    flows = FlowInstance.objects.bulk_create(FlowInstanceFactory.build_batch(plan.hot))
    saves = max(10, int(50 * plan.scale))
    save_cached = FlowInstance.objects.bulk_create(FlowInstanceFactory.build_batch(saves))
    save_plain = PlainFlowInstance.objects.bulk_create(PlainFlowInstanceFactory.build_batch(saves))
    # Reload them as a read would, so both twins save rows shaped alike.
    save_cached = list(FlowInstance.objects.filter(pk__in=[o.pk for o in save_cached]))
    save_plain = list(PlainFlowInstance.objects.filter(pk__in=[o.pk for o in save_plain]))
    with connection.cursor() as cur:
        for m in (FlowInstance, PlainFlowInstance):
            cur.execute(f'ANALYZE "{m._meta.db_table}"')
    top = max(users)
    # 5,000 strings of 1,000 characters: a 5 MB JSON value.
    heavy = User.objects.create(
        username="heavy",
        email="heavy@example.com",
        model_capability_settings={f"k{i}": "x" * 1000 for i in range(5000)},
    )
    return Data(
        users=users,
        hot=hot,
        hot_emails=hot_emails,
        hot_values=hot_values,
        many=many,
        cold=cold,
        cold_orm=cold_orm,
        cold_floor=cold_floor,
        cold_fill=cold_fill,
        memory=memory,
        absent=[top + 1_000_000 + i for i in range(plan.hot)],
        flows=[(f.tenant_id, f.session_id) for f in flows],
        save_cached=save_cached,
        save_plain=save_plain,
        big=heavy.pk,
    )


# -- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    label: str
    sample: Callable[[int], float]  # runs n operations, returns µs per operation
    prepare: Callable[[], None] | None = None  # untimed, before each sample
    # (model, counter, expected per operation): checks that the case read the tier it names
    expect: tuple[Any, str, int] | None = None
    samples: list[float] = field(default_factory=list)
    off_tier: int = 0


class Bench:
    def __init__(self, plan: Plan, data: Data) -> None:
        from demo_project.demo.models import FlowInstance, User

        self.plan = plan
        self.d = data
        self.User = User
        self.Flow = FlowInstance
        self.cold = iter(data.cold)
        self.cold_orm = iter(data.cold_orm)
        self.cold_floor = iter(data.cold_floor)
        self.cold_fill = iter(data.cold_fill)
        self.cases = self._cases()

    # Helpers shared by the cases; none of them is timed.
    def _ring(self, items: list[Any], n: int) -> list[Any]:
        return [items[i % len(items)] for i in range(n)]

    def _prime(self, fn: Callable[[Any], Any], items: list[Any]) -> None:
        import tiered_cache
        from tiered_cache.tiers.remote import redis_tier

        # Through L2: a row L1 still holds would not be stored again in L2, which may have
        # lost it since (an L2 case's floor reads L2's copy directly).
        tiered_cache.clear_local()
        for x in items:
            try:
                fn(x)
            except Exception:  # negative rows raise DoesNotExist: that is what is primed
                pass
        redis_tier.wait_for_fills()

    def _cases(self) -> list[Case]:
        from django.test import override_settings

        import tiered_cache
        from tiered_cache.breaker import breaker
        from tiered_cache.conf import conf
        from tiered_cache.keys import read_call
        from tiered_cache.registry import model_cache
        from tiered_cache.tiers.remote import fresh_token, redis_tier

        User, Flow, d, ring = self.User, self.Flow, self.d, self._ring
        clear = tiered_cache.clear_local
        now = time.perf_counter_ns
        hot, emails, flows, absent = d.hot, d.hot_emails, d.flows, d.absent

        def pk_get(pk: int) -> Any:
            return User.objects.get_cached(pk=pk)

        def email_get(email: str) -> Any:
            return User.objects.get_cached(email=email)

        def flow_get(tf: tuple[str, str]) -> Any:
            return Flow.objects.get_cached(tenant_id=tf[0], session_id=tf[1])

        # Plain ORM reads.
        def orm_pk(n: int) -> float:
            seq = ring(hot, n)
            t = now()
            for pk in seq:
                User.objects.get(pk=pk)
            return (now() - t) / n / NS

        def orm_email(n: int) -> float:
            seq = ring(emails, n)
            t = now()
            for e in seq:
                User.objects.get(email=e)
            return (now() - t) / n / NS

        def orm_flow(n: int) -> float:
            seq = ring(flows, n)
            t = now()
            for tenant, session in seq:
                Flow.objects.get(tenant_id=tenant, session_id=session)
            return (now() - t) / n / NS

        def from_db(n: int) -> float:
            seq = ring(d.hot_values, n)
            t = now()
            for values in seq:
                User.from_db("default", None, values)
            return (now() - t) / n / NS

        # An L1 hit's floor: the entry taken from L1 (under its lock, as the LRU order moves)
        # and the caller's own instance built from it, nothing else.
        def floor_l1(n: int) -> float:
            from tiered_cache.tiers.local import local_tier

            mc = model_cache(User.objects)
            keys = ring([(mc.pk_lookup.key_prefix, "default", "", pk) for pk in hot], n)
            get, thaw = local_tier.get, mc.codec.thaw
            t = now()
            for key in keys:
                thaw(get(key), "default")
            return (now() - t) / n / NS

        # L1 hits: the rows were read once by the case's prepare step (untimed).
        def l1_pk(n: int) -> float:
            seq = ring(hot, n)
            t = now()
            for pk in seq:
                User.objects.get_cached(pk=pk)
            return (now() - t) / n / NS

        def l1_email(n: int) -> float:
            seq = ring(emails, n)
            t = now()
            for e in seq:
                User.objects.get_cached(email=e)
            return (now() - t) / n / NS

        def l1_flow(n: int) -> float:
            seq = ring(flows, n)
            t = now()
            for tenant, session in seq:
                Flow.objects.get_cached(tenant_id=tenant, session_id=session)
            return (now() - t) / n / NS

        def l1_negative(n: int) -> float:
            seq = ring(absent, n)
            DoesNotExist = User.DoesNotExist
            t = now()
            for pk in seq:
                try:
                    User.objects.get_cached(pk=pk)
                except DoesNotExist:
                    pass
            return (now() - t) / n / NS

        # L2 hits: L1 is emptied before every read; only the read is timed.
        def l2(
            fn: Callable[[Any], Any], items: list[Any], negative: bool = False
        ) -> Callable[[int], float]:
            def sample(n: int) -> float:
                seq = ring(items, n)
                DoesNotExist = User.DoesNotExist
                total = 0
                for x in seq:
                    clear()
                    t = now()
                    try:
                        fn(x)
                    except DoesNotExist:
                        if not negative:
                            raise
                    total += now() - t
                return total / n / NS

            return sample

        def hot_keys(n: int) -> list[str]:
            """The L2 keys of n hot rows, in turn."""
            mc = model_cache(User.objects)
            return ring([mc.key(mc.pk_lookup, (pk,)) for pk in hot], n)

        # The floor of an L2 hit: a plain redis-py GET of the same stored payload.
        def redis_get(n: int) -> float:
            keys, get = hot_keys(n), redis_tier.client.get
            t = now()
            for key in keys:
                get(key)
            return (now() - t) / n / NS

        # An L2 hit's floors: the read script alone (the round trip that checks the entry
        # against its generation and row version), and a GET of the payload opened as any
        # authenticated read must (no validity check at all).
        def floor_script(n: int) -> float:
            mc = model_cache(User.objects)
            g = mc.home
            fresh = fresh_token()
            seq = [read_call(g, key, "", 0, fresh, "") for key in hot_keys(n)]
            t = now()
            for call in seq:
                redis_tier.scripts([call])
            return (now() - t) / n / NS

        def floor_l2(n: int) -> float:
            mc, keys, get = model_cache(User.objects), hot_keys(n), redis_tier.client.get
            t = now()
            for key in keys:
                open_rows(mc, [key], [get(key)])
            return (now() - t) / n / NS

        # Misses: rows never read before, so neither tier has them.
        # Its baseline: the ORM get of rows never read either (a row read for the first time
        # may not be in the database's buffers; the hot rows of orm_pk are).
        def orm_cold(n: int) -> float:
            seq = [next(self.cold_orm) for _ in range(n)]
            t = now()
            for pk in seq:
                User.objects.get(pk=pk)
            return (now() - t) / n / NS

        def miss_pk(n: int) -> float:
            seq = [next(self.cold) for _ in range(n)]
            total = 0
            for pk in seq:
                t = now()
                User.objects.get_cached(pk=pk)
                total += now() - t
            return total / n / NS

        # The floors of issue 13's targets: what any design of the case must do at least,
        # measured the same way as the case (each operation alone, the machine as it is).
        # A miss asks L2 before the database: one round trip, then the ORM get.
        def floor_miss(n: int) -> float:
            from tiered_cache.tiers.remote import redis_tier

            client = redis_tier.client
            seq = [next(self.cold_floor) for _ in range(n)]
            total = 0
            for pk in seq:
                t = now()
                client.get(f"tc-bench-floor:{pk}")
                User.objects.get(pk=pk)
                total += now() - t
            return total / n / NS

        # A miss also stores the row in L2, off the caller's path but in its process: the
        # same, and the row encoded as L2 holds it and SET by a second thread, as a fill is.
        def floor_miss_fill(n: int) -> float:
            from tiered_cache.tiers.remote import redis_tier

            client = redis_tier.client
            codec = model_cache(User.objects).codec
            seq = [next(self.cold_fill) for _ in range(n)]
            sets: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()

            def setter() -> None:
                while (item := sets.get()) is not None:
                    client.set(item[0], item[1], px=60_000)

            thread = threading.Thread(target=setter, daemon=True)
            thread.start()
            total = 0
            for pk in seq:
                t = now()
                client.get(f"tc-bench-floor:{pk}")
                obj = User.objects.get(pk=pk)
                values = codec.values(obj)
                assert values is not None
                sets.put((f"tc-bench-floor:{pk}", codec.encode(codec.freeze(values))))
                total += now() - t
            sets.put(None)
            thread.join()
            return total / n / NS

        # get_many_cached from L2: one MGET of the 100 stored payloads, then each opened.
        def floor_many(n: int) -> float:
            mc = model_cache(User.objects)
            keys = [mc.key(mc.pk_lookup, (pk,)) for pk in d.many]
            client = redis_tier.client
            t = now()
            for _ in range(n):
                open_rows(mc, keys, client.mget(keys))
            return (now() - t) / n / NS

        # get_many_cached from L1: the 100 instances built the cheapest way Django has.
        def floor_many_l1(n: int) -> float:
            rows = [d.hot_values[i % len(d.hot_values)] for i in range(100)]
            t = now()
            for _ in range(n):
                for values in rows:
                    User.from_db("default", None, values)
            return (now() - t) / n / NS

        def in_bulk(n: int) -> float:
            pks = d.many
            t = now()
            for _ in range(n):
                User.objects.in_bulk(pks)
            return (now() - t) / n / NS

        def many_l1(n: int) -> float:
            pks = d.many
            t = now()
            for _ in range(n):
                User.objects.get_many_cached(pks)
            return (now() - t) / n / NS

        # The L1 hit of a row with a 5 MB JSON value, beside the cheapest faithful copy of
        # that value (unpickling it: what a hit must do, the caller's instance being its own).
        def l1_big(n: int) -> float:
            t = now()
            for _ in range(n):
                User.objects.get_cached(pk=d.big)
            return (now() - t) / n / NS

        big_value = User.objects.get(pk=d.big).model_capability_settings
        big_blob = pickle.dumps(big_value, protocol=pickle.HIGHEST_PROTOCOL)

        def copy_big(n: int) -> float:
            t = now()
            for _ in range(n):
                pickle.loads(big_blob)
            return (now() - t) / n / NS

        def many_l2(n: int) -> float:
            pks = d.many
            total = 0
            for _ in range(n):
                clear()
                t = now()
                found = User.objects.get_many_cached(pks)
                total += now() - t
                assert len(found) == len(pks)
            return total / n / NS

        def saver(objs: list[Any]) -> Callable[[int], float]:
            def sample(n: int) -> float:
                seq = ring(objs, n)
                t = now()
                for obj in seq:
                    obj.current_step += 1
                    obj.save()
                return (now() - t) / n / NS

            return sample

        # A cached save must reach Redis before it returns (read-your-writes, and no
        # invalidation lost to a crash): the plain save, then one round trip.
        def floor_save(n: int) -> float:
            from tiered_cache.tiers.remote import redis_tier

            client = redis_tier.client
            seq = ring(d.save_plain, n)
            t = now()
            for obj in seq:
                obj.current_step += 1
                obj.save()
                client.get("tc-bench-floor")
            return (now() - t) / n / NS

        # The same save's Redis part as a cached save sends it: the invalidation's scripts
        # (the function counter's bump, then the new row version, write count, log of writes
        # and bus message), built beforehand for rows no entry uses, run after the plain save.
        def floor_save_scripts(n: int) -> float:
            from demo_project.demo.models import FlowInstance
            from tiered_cache.invalidation import Batch
            from tiered_cache.registry import model_cache
            from tiered_cache.tiers.remote import redis_tier

            mc = model_cache(FlowInstance.objects)
            acks = redis_tier.replica_acks()
            sends = []
            for i in range(n):
                batch = Batch()
                batch.add_rows(mc.home, {mc.row_id_of(-1 - i)})
                sends.append(batch.redis_calls())
            seq = ring(d.save_plain, n)
            t = now()
            for obj, (calls, after) in zip(seq, sends, strict=True):
                obj.current_step += 1
                obj.save()
                redis_tier.scripts(calls, force=True, acks=acks, publish=after)
            return (now() - t) / n / NS

        def breaker_open(n: int) -> float:
            seq = ring(hot, n)
            tc = {**conf.raw, "BREAKER_RECOVERY_TIME": 3600.0}
            quiet = logging.getLogger("tiered_cache")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # "Redis failed 3 times": we made it so
            with override_settings(TIERED_CACHE=tc):
                for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
                    breaker.failure()
                assert breaker.state == "open"
                total = 0
                try:
                    for pk in seq:
                        clear()  # L1 (still trusted: the bus is up) must not answer
                        t = now()
                        User.objects.get_cached(pk=pk)
                        total += now() - t
                    assert breaker.state == "open"
                finally:
                    breaker.reset()
                    quiet.setLevel(level)
            return total / n / NS

        def prime(fn: Callable[[Any], Any], items: list[Any]) -> Callable[[], None]:
            return lambda: self._prime(fn, items)

        p_hot, p_emails = prime(pk_get, hot), prime(email_get, emails)
        p_flows, p_absent = prime(flow_get, flows), prime(pk_get, absent)
        p_many = prime(User.objects.get_many_cached, [d.many])
        return [
            Case("orm_pk", "ORM get(pk)", orm_pk),
            Case("l1_pk", "get_cached(pk) L1 hit", l1_pk, p_hot, (User, "l1_hits", 1)),
            Case("from_db", "Model.from_db, same rows", from_db),
            Case("floor_l1", "  floor: L1's entry and a new instance", floor_l1, p_hot),
            Case("l2_pk", "get_cached(pk) L2 hit", l2(pk_get, hot), p_hot, (User, "l2_hits", 1)),
            Case("redis_get", "  Redis GET of the same payload (redis-py)", redis_get, p_hot),
            Case("floor_script", "  floor: the read script alone", floor_script, p_hot),
            Case("floor_l2", "  floor: that GET, then MAC, decode, instance", floor_l2, p_hot),
            Case("orm_cold", "ORM get(pk) of a row never read", orm_cold),
            Case("floor_miss", "  floor: a Redis GET, then that ORM get", floor_miss),
            Case(
                "floor_miss_fill",
                "  floor: the same, and a SET of the row from a second thread",
                floor_miss_fill,
            ),
            Case("miss_pk", "get_cached(pk) miss", miss_pk, None, (User, "misses", 1)),
            Case(
                "neg_l1",
                "get_cached(pk) negative, L1",
                l1_negative,
                p_absent,
                (User, "negative_hits", 1),
            ),
            Case(
                "neg_l2",
                "get_cached(pk) negative, L2",
                l2(pk_get, absent, negative=True),
                p_absent,
                (User, "negative_hits", 1),
            ),
            Case("orm_email", "ORM get(email)", orm_email),
            Case("l1_email", "get_cached(email) L1 hit", l1_email, p_emails, (User, "l1_hits", 1)),
            Case(
                "l2_email",
                "get_cached(email) L2 hit",
                l2(email_get, emails),
                p_emails,
                (User, "l2_hits", 1),
            ),
            Case("orm_flow", "ORM get(tenant_id, session_id)", orm_flow),
            Case(
                "l1_flow",
                "get_cached(tenant, session) L1 hit",
                l1_flow,
                p_flows,
                (Flow, "l1_hits", 1),
            ),
            Case(
                "l2_flow",
                "get_cached(tenant, session) L2 hit",
                l2(flow_get, flows),
                p_flows,
                (Flow, "l2_hits", 1),
            ),
            Case("in_bulk", "ORM in_bulk(100 pks)", in_bulk),
            Case(
                "floor_many",
                "  floor: one MGET of the 100, then MAC, decode, instance",
                floor_many,
                p_many,
            ),
            Case("floor_many_l1", "  floor: Model.from_db of 100 rows", floor_many_l1),
            Case(
                "many_l2", "get_many_cached(100) warm L2", many_l2, p_many, (User, "l2_hits", 100)
            ),
            Case(
                "many_l1", "get_many_cached(100) warm L1", many_l1, p_many, (User, "l1_hits", 100)
            ),
            Case(
                "l1_big",
                "get_cached(pk) L1 hit, 5 MB JSON row",
                l1_big,
                prime(pk_get, [d.big]),
                (User, "l1_hits", 1),
            ),
            Case("copy_big", "  a copy of its JSON value (pickle.loads)", copy_big),
            Case("save_plain", "save() PlainFlowInstance", saver(d.save_plain)),
            Case("save_cached", "save() FlowInstance (cached)", saver(d.save_cached)),
            Case("floor_save", "  floor: the plain save, then a Redis GET", floor_save),
            Case(
                "floor_save_scripts",
                "  floor: the plain save, then the invalidation's scripts",
                floor_save_scripts,
            ),
            Case(
                "breaker", "get_cached(pk), breaker open", breaker_open, None, (User, "misses", 1)
            ),
        ]

    def run(self, log: Callable[[str], None]) -> None:
        from tiered_cache.registry import model_cache

        rng = random.Random(7)
        cases = self.cases
        for r in range(self.plan.rounds + 1):
            order = cases[:]
            rng.shuffle(order)
            for case in order:
                n = self.plan.ops(case.id)
                if case.prepare is not None:
                    case.prepare()
                before = None
                if case.expect is not None:
                    model, counter, per_op = case.expect
                    mc = model_cache(model.objects)
                    before = getattr(mc.counters, counter)
                us = case.sample(n)
                if before is not None:
                    got = getattr(mc.counters, counter) - before
                    if got != n * per_op:
                        case.off_tier += abs(n * per_op - got)
                if r:  # round 0 warms up connections, prepared statements and caches
                    case.samples.append(us)
            gc.collect()
            if r == 0:
                log("  warm-up round done")
            elif r % 10 == 0:
                log(f"  round {r}/{self.plan.rounds}")


# -- commit-to-drop latency across processes --------------------------------------------------


def commit_to_drop(samples: int, busy_threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    """benchmarks/latency.py: from the COMMIT of a write here to the drop of the row from the L1
    of a spawned process (its bus listener applying our message); `busy_threads` threads of
    that process read from L1 meanwhile, as request threads of a busy web process do. With
    busy threads, its floor too: a message's trip to a bare subscriber thread of such a
    process (measure_publish_to_receive), under "floor"."""
    from benchmarks.latency import (
        format_result,
        measure_commit_to_drop,
        measure_publish_to_receive,
    )

    result = measure_commit_to_drop(samples, busy_threads=busy_threads)
    log("  " + format_result(result))
    if busy_threads:
        result["floor"] = measure_publish_to_receive(samples, busy_threads=busy_threads)
        log("  floor, publish to a bare subscriber: " + format_result(result["floor"]))
    return result


# -- L1 memory ------------------------------------------------------------------------------


def _wait_for_trust(timeout: float) -> bool:
    from tiered_cache.bus import bus

    return bus.wait_trusted(timeout)


def fill_l1(pks: list[int]) -> dict[str, int]:
    """Read these users through get_many_cached, 200 at a time, until L1 holds them all.
    A read while the bus is not trusted (a heartbeat answered late on a busy machine) stores
    nothing in either tier: such a chunk is read again once the bus is trusted. Returns how
    the reads were answered (counter deltas)."""
    from demo_project.demo.models import User
    from tiered_cache.registry import model_cache
    from tiered_cache.tiers.local import local_tier

    mc = model_cache(User.objects)
    before = mc.counters.as_dict()
    start = len(local_tier)
    for i in range(0, len(pks), 200):
        chunk = pks[i : i + 200]
        for _ in range(20):
            User.objects.get_many_cached(chunk)
            if len(local_tier) >= start + i + len(chunk):
                break
            _wait_for_trust(5)
    after = mc.counters.as_dict()
    return {k: after[k] - before[k] for k in ("l1_hits", "l2_hits", "misses")}


def l1_bytes_per_entry(pks: list[int]) -> dict[str, Any]:
    """Bytes that L1 holds per cached user: traced memory after filling L1 with these rows
    minus before, over the entries added. Measured twice: filled from the database (L2
    cold), then filled from L2 (L1 cleared)."""
    import tiered_cache
    from tiered_cache.tiers.local import local_tier
    from tiered_cache.tiers.remote import redis_tier

    out: dict[str, Any] = {}
    for source in ("db", "l2"):
        tiered_cache.clear_local()
        redis_tier.wait_for_fills(120)
        gc.collect()
        # The cyclic collector would walk the growing L1 again and again; rows hold no
        # cycles, and one collection at the end frees whatever the fill left behind.
        gc.disable()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            reads = fill_l1(pks)
            redis_tier.wait_for_fills(120)
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
            gc.enable()
        entries = len(local_tier)
        out[source] = {
            "entries": entries,
            "bytes": used,
            "reads": reads,
            "per_entry": used / entries if entries else float("nan"),
        }
    tiered_cache.clear_local()
    gc.collect()
    return out


# -- report -----------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _quantile(xs: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def focus_table(cases: list[Case]) -> str:
    """--cases: each case's median, then every pair's ratio (median of in-round ratios)."""
    lines = [f"{c.id:<12} {statistics.median(c.samples):>10,.2f} µs  {c.label}" for c in cases]
    for i, a in enumerate(cases):
        for b in cases[i + 1 :]:
            lines.append(f"{a.id} / {b.id}: {_paired_ratio(a, b):.3f}x")
    return "\n".join(lines)


def _paired_ratio(a: Case, b: Case) -> float:
    """Median over rounds of a/b measured in the same round."""
    return _median([x / y for x, y in zip(a.samples, b.samples, strict=True) if y > 0])


def _fmt_us(us: float) -> str:
    if math.isnan(us):
        return "—"
    if us >= 1000:
        return f"{us:,.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def _fmt_vs(r: float) -> str:
    """A case's time over the ORM get's: '250x faster' below 1, '1.08x' above."""
    if math.isnan(r):
        return "—"
    if r < 0.5:
        return f"{1 / r:,.0f}x faster" if r < 0.1 else f"{1 / r:.1f}x faster"
    return f"{r:.2f}x"


def build_rows(
    cases: list[Case],
    latency: dict[int, dict[str, Any]] | None,
    memory: dict[int, dict[str, Any]],
    plan: Plan,
) -> list[dict[str, Any]]:
    by = {c.id: c for c in cases}
    orm = by["orm_pk"]
    rows: list[dict[str, Any]] = []

    def row(
        case: Case | None,
        label: str,
        target: str = "",
        measured: str = "",
        ok: bool | None = None,
        **extra: Any,
    ) -> None:
        med = _median(case.samples) if case else extra.pop("median_us", float("nan"))
        vs = _paired_ratio(case, orm) if case else extra.pop("vs_orm", float("nan"))
        rows.append(
            {
                "id": extra.pop("id", case.id if case else label),
                "case": label,
                "median_us": med,
                "p25_us": _quantile(case.samples, 0.25) if case else float("nan"),
                "p75_us": _quantile(case.samples, 0.75) if case else float("nan"),
                "vs_orm": vs,
                "target": target,
                "measured": measured,
                "result": "" if ok is None else ("PASS" if ok else "MISS"),
                "rounds": len(case.samples) if case else 0,
                "off_tier": case.off_tier if case else 0,
                **extra,
            }
        )

    def floor(cid: str, base: str, case: str) -> None:
        """A floor case: its ratio to the target's baseline, and the case's to it."""
        to_base = _paired_ratio(by[cid], by[base])
        row(
            by[cid],
            by[cid].label,
            measured=f"{to_base:.3f}x {base}; {case} {_paired_ratio(by[case], by[cid]):.3f}x it",
        )

    def faster(cid: str, base: str, times: float, label: str | None = None) -> None:
        r = _paired_ratio(by[base], by[cid])
        row(
            by[cid],
            label or by[cid].label,
            f">= {times:g}x faster than {by[base].label}",
            f"{r:,.1f}x faster",
            r >= times,
        )

    def at_most(cid: str, base: str, times: float, label: str | None = None) -> None:
        r = _paired_ratio(by[cid], by[base])
        # Three decimals: 1.104x must not print as a passing-looking 1.10x.
        row(
            by[cid],
            label or by[cid].label,
            f"<= {times:g}x {by[base].label}",
            f"{r:.3f}x",
            r <= times,
        )

    row(orm, orm.label, measured="baseline")
    faster("l1_pk", "orm_pk", 100)
    at_most("l1_pk", "from_db", 1.5, "  same L1 hit, vs from_db")
    rows[-1]["id"] = "l1_pk_vs_from_db"
    row(by["from_db"], by["from_db"].label)
    floor("floor_l1", "from_db", "l1_pk")
    faster("l2_pk", "orm_pk", 4)
    at_most("l2_pk", "redis_get", 1.3, "  same L2 hit, vs a Redis GET")
    rows[-1]["id"] = "l2_pk_vs_get"
    row(by["redis_get"], by["redis_get"].label)
    floor("floor_script", "redis_get", "l2_pk")
    floor("floor_l2", "redis_get", "l2_pk")
    at_most("miss_pk", "orm_pk", 1.2)
    at_most("miss_pk", "orm_cold", 1.2, "  same miss, vs the ORM get of a row never read")
    rows[-1]["id"] = "miss_vs_cold"
    row(by["orm_cold"], by["orm_cold"].label)
    floor("floor_miss", "orm_cold", "miss_pk")
    floor("floor_miss_fill", "orm_cold", "miss_pk")
    row(by["neg_l1"], by["neg_l1"].label)
    row(by["neg_l2"], by["neg_l2"].label)
    row(by["orm_email"], by["orm_email"].label)
    faster("l1_email", "orm_email", 100)
    faster("l2_email", "orm_email", 4)
    row(by["orm_flow"], by["orm_flow"].label)
    faster("l1_flow", "orm_flow", 100)
    faster("l2_flow", "orm_flow", 4)
    row(by["in_bulk"], by["in_bulk"].label)
    faster("many_l2", "in_bulk", 5)
    faster("many_l1", "in_bulk", 30)
    floor("floor_many", "in_bulk", "many_l2")
    floor("floor_many_l1", "in_bulk", "many_l1")
    at_most("l1_big", "copy_big", 1.2)
    row(by["copy_big"], by["copy_big"].label)
    row(by["save_plain"], by["save_plain"].label)
    at_most("save_cached", "save_plain", 1.2)
    floor("floor_save", "save_plain", "save_cached")
    floor("floor_save_scripts", "save_plain", "save_cached")
    at_most("breaker", "orm_pk", 1.1)

    for busy, res in (latency or {}).items():
        who = f"busy listener ({busy} threads)" if busy else "idle listener"
        n = f"n={res['measured']}"
        if res["p50_ms"] is None:
            row(
                None,
                f"commit-to-drop p99, {who}",
                "<= 5 ms p99",
                "no samples",
                False,
                id=f"drop_p99_busy{busy}",
            )
            continue
        row(
            None,
            f"commit-to-drop p50, {who}, {n}",
            measured=f"{res['p50_ms']:.2f} ms",
            median_us=res["p50_ms"] * 1000,
            id=f"drop_p50_busy{busy}",
        )
        ok = res["p99_ms"] <= 5.0 and not res["missed"] and not res["still_in_l1"]
        row(
            None,
            f"commit-to-drop p99, {who}, {n}",
            "<= 5 ms p99",
            f"{res['p99_ms']:.2f} ms",
            ok,
            median_us=res["p99_ms"] * 1000,
            id=f"drop_p99_busy{busy}",
            missed=res["missed"],
            still_in_l1=res["still_in_l1"],
        )
        low = res.get("floor")
        if low and low["p99_ms"]:
            row(
                None,
                "  floor: publish to a bare subscriber thread of that process, p99",
                measured=f"{low['p99_ms']:.2f} ms; commit-to-drop "
                f"{res['p99_ms'] / low['p99_ms']:.2f}x it (p50 {low['p50_ms']:.2f} ms)",
                median_us=low["p99_ms"] * 1000,
                id=f"drop_floor_p99_busy{busy}",
            )
    for size in (10_000, 100_000):
        m = memory.get(size)
        for source, how in (("db", "filled from DB"), ("l2", "filled from L2")):
            label = f"L1 memory per user, {size:,} entries, {how}"
            if m is None:
                row(None, label, "<= 1.5 KB", "skipped (--quick)", None, id=f"mem_{size}_{source}")
                continue
            b = m[source]["per_entry"]
            measured = f"{b:,.0f} B"
            if source == "l2" and m[source]["reads"]["misses"]:
                measured += f" ({m[source]['reads']['misses']:,} read from DB)"
            row(
                None,
                label,
                "<= 1.5 KB",
                measured,
                b <= 1536,
                id=f"mem_{size}_{source}",
                bytes_per_entry=b,
                entries=m[source]["entries"],
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = ["case", "median µs", "p25–p75 µs", "vs ORM get", "target", "measured", "result"]
    body = []
    for r in rows:
        spread = (
            "—" if math.isnan(r["p25_us"]) else f"{_fmt_us(r['p25_us'])}–{_fmt_us(r['p75_us'])}"
        )
        result = r["result"]
        if r["off_tier"]:
            result = (result + " *").strip()
        body.append(
            [
                r["case"],
                _fmt_us(r["median_us"]),
                spread,
                _fmt_vs(r["vs_orm"]),
                r["target"] or "—",
                r["measured"] or "—",
                result or "—",
            ]
        )
    return markdown_table(head, body, {1, 2, 3})


def markdown_table(head: list[str], body: list[list[str]], right: set[int]) -> str:
    """A Markdown table with aligned columns; `right`: the columns aligned right."""
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def machine(redis_client: Any = None) -> dict[str, Any]:
    """Date, host, CPU, load and versions, for the header of a run (the load test's too);
    `redis_client`: the Redis measured, the cache's own by default."""
    import django
    from django.db import connection

    from tiered_cache.tiers.remote import redis_tier

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    with connection.cursor() as cur:
        cur.execute("SHOW server_version")
        row = cur.fetchone()
    client = redis_client if redis_client is not None else redis_tier.client
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "postgresql": row[0].split()[0] if row else "?",
        "redis": client.info("server")["redis_version"],
    }


# -- profiles ---------------------------------------------------------------------------------


def profile_paths(data: Data, l1_hits: int, l2_hits: int, many_calls: int) -> None:
    """cProfile of the hot paths, top 25 functions by tottime each: L1 hits by pk and by a
    composite lookup, L2 hits, get_many_cached warm in L2, misses, and a cached save."""
    import cProfile
    import pstats

    import tiered_cache
    from demo_project.demo.models import FlowInstance, User
    from tiered_cache.registry import model_cache
    from tiered_cache.tiers.remote import redis_tier

    def show(title: str, prof: cProfile.Profile, n: int, el: float, answered: Any = None) -> None:
        how = f"; answered: {answered}" if answered else ""
        print(
            f"\n== {title}: {n:,} calls, {el / n * 1e6:,.1f} µs each under cProfile{how}; "
            "top 25 by tottime =="
        )
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)

    def answered(mc: Any, before: dict[str, int]) -> dict[str, int]:
        now = mc.counters.as_dict()
        delta = {k: now[k] - before[k] for k in ("l1_hits", "l2_hits", "misses")}
        return {k: v for k, v in delta.items() if v}

    def loop(
        fn: Callable[[Any], Any], items: list[Any], before_each: Callable[[], Any] | None = None
    ) -> tuple[cProfile.Profile, float]:
        prof = cProfile.Profile()
        el = 0.0
        if before_each is None:
            t = time.perf_counter()
            prof.enable()
            for x in items:
                fn(x)
            prof.disable()
            return prof, time.perf_counter() - t
        for x in items:
            before_each()
            t = time.perf_counter()
            prof.enable()
            fn(x)
            prof.disable()
            el += time.perf_counter() - t
        return prof, el

    users, flows = model_cache(User.objects), model_cache(FlowInstance.objects)

    # L1 hits, by pk and by (tenant_id, session_id).
    hot = data.hot
    for pk in hot:
        User.objects.get_cached(pk=pk)
    before = users.counters.as_dict()
    prof, el = loop(
        lambda pk: User.objects.get_cached(pk=pk), [hot[i % len(hot)] for i in range(l1_hits)]
    )
    show("L1 hit, User.objects.get_cached(pk=...)", prof, l1_hits, el, answered(users, before))

    for tenant, session in data.flows:
        FlowInstance.objects.get_cached(tenant_id=tenant, session_id=session)
    before = flows.counters.as_dict()
    prof, el = loop(
        lambda f: FlowInstance.objects.get_cached(tenant_id=f[0], session_id=f[1]),
        [data.flows[i % len(data.flows)] for i in range(l1_hits)],
    )
    show(
        "L1 hit, FlowInstance.objects.get_cached(tenant_id=..., session_id=...)",
        prof,
        l1_hits,
        el,
        answered(flows, before),
    )

    # L2 hits: distinct rows warm in L2, never seen by this L1 (no clear between reads).
    pks = [pk for group in data.memory for pk in group][:l2_hits]
    fill_l1(pks)
    redis_tier.wait_for_fills(120)
    tiered_cache.clear_local()
    before = users.counters.as_dict()
    prof, el = loop(lambda pk: User.objects.get_cached(pk=pk), pks)
    show(
        "L2 hit, User.objects.get_cached(pk=...) of distinct rows",
        prof,
        len(pks),
        el,
        answered(users, before),
    )

    many = data.many
    User.objects.get_many_cached(many)
    redis_tier.wait_for_fills()
    before = users.counters.as_dict()
    prof, el = loop(User.objects.get_many_cached, [many] * many_calls, tiered_cache.clear_local)
    show(
        f"get_many_cached of {len(many)} rows warm in L2, L1 cleared before each (unprofiled)",
        prof,
        many_calls,
        el,
        answered(users, before),
    )

    # Misses: rows neither tier has seen.
    before = users.counters.as_dict()
    prof, el = loop(lambda pk: User.objects.get_cached(pk=pk), data.cold)
    redis_tier.wait_for_fills()
    show(
        "miss, User.objects.get_cached(pk=...) of rows never read",
        prof,
        len(data.cold),
        el,
        answered(users, before),
    )

    # save(): the cached model, then the uncached twin's time for comparison.
    def save(obj: Any) -> None:
        obj.current_step += 1
        obj.save()

    n_saves = 500
    plain = [data.save_plain[i % len(data.save_plain)] for i in range(n_saves)]
    t = time.perf_counter()
    for obj in plain:
        save(obj)
    plain_us = (time.perf_counter() - t) / n_saves * 1e6
    prof, el = loop(save, [data.save_cached[i % len(data.save_cached)] for i in range(n_saves)])
    show(
        f"save() of a cached FlowInstance (PlainFlowInstance, unprofiled: {plain_us:,.0f} µs)",
        prof,
        n_saves,
        el,
    )


# -- main -------------------------------------------------------------------------------------


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def measure_cluster(quick: bool, log: Any) -> dict[str, Any]:
    """benchmarks/cluster.py: each measure on a private cluster of its own."""
    from benchmarks.cluster import measure_bus, measure_spread, measure_writes

    rows = 10_000 if quick else 100_000
    log(f"Redis Cluster: {rows:,} rows of one model spread, the bus, invalidations")
    return {
        "spread": measure_spread(rows),
        "bus": measure_bus(8 if quick else 64, 200 if quick else 2000),
        "writes": [measure_writes(50 if quick else 300, on) for on in ("single", "cluster")],
    }


def format_cluster(result: dict[str, Any]) -> str:
    from benchmarks.cluster import format_result

    return "\n" + format_result(result["spread"], result["bus"], result["writes"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run for CI")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--rounds", type=int, help="measured rounds (default 31, 3 with --quick)")
    p.add_argument(
        "--db",
        default=os.environ.get("TC_BENCH_DB", DEFAULT_DB),
        help=f"database to recreate and drop (default {DEFAULT_DB})",
    )
    p.add_argument("--keep-db", action="store_true", help="leave the database in place")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the L1 and L2 hit paths (cProfile) instead of the table",
    )
    p.add_argument(
        "--cases",
        metavar="ID,ID",
        help="measure only these cases (ids as in OPS, e.g. miss_pk,orm_pk) and print each "
        "one's median and its ratio to every other: a quick look while changing one path",
    )
    p.add_argument(
        "--size-only",
        action="store_true",
        help="measure only the dashboard with a million unrelated keys (benchmarks/size.py)",
    )
    p.add_argument(
        "--idle-only",
        action="store_true",
        help="measure only what idle processes cost (benchmarks/idle.py)",
    )
    p.add_argument(
        "--cluster-only",
        action="store_true",
        help="measure only the Redis Cluster figures (benchmarks/cluster.py)",
    )
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.profile:
        plan = Plan(**{**plan.__dict__, "memory_sizes": (20_000,)})
    if args.cases:
        plan = Plan(**{**plan.__dict__, "memory_sizes": ()})

    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    prefix = configure_django(args.db)
    # Registered before tiered_cache starts its threads: atexit runs handlers last-in
    # first-out, so this runs after the stats publisher's final push and deletes it too.
    atexit.register(_delete_keys_quietly, prefix)
    status = 0
    created = False
    try:
        log(f"database {args.db}: recreating")
        recreate_database()
        created = True
        from tiered_cache.bus import bus
        from tiered_cache.tiers.remote import redis_tier

        redis_tier.client.ping()
        if args.size_only:
            from benchmarks.size import format_result as format_size
            from benchmarks.size import measure_dashboard

            print(format_size(measure_dashboard(50_000 if args.quick else 1_000_000)))
            return 0
        if args.idle_only:
            from benchmarks.idle import format_result as format_idle
            from benchmarks.idle import measure_idle

            n_idle, idle_seconds = (4, 2.0) if args.quick else (64, 10.0)
            print(format_idle(measure_idle(n_idle, idle_seconds)))
            return 0
        if args.cluster_only:
            print(format_cluster(measure_cluster(args.quick, log)))
            return 0
        # Cold rows: one per miss, every round including the warm-up.
        cold = plan.ops("miss_pk") * (plan.rounds + 1)
        data = make_data(plan, cold)
        log(
            f"demo data: {len(data.users):,} users "
            f"({min(plan.user_pool, len(data.users)):,} from UserFactory), "
            f"{len(data.flows) + len(data.save_cached)} flows, "
            f"{len(data.save_plain)} plain flows"
        )
        if not _wait_for_trust(5):
            raise RuntimeError("the invalidation bus did not become trusted within 5 s")
        gc.collect()
        gc.freeze()

        if args.profile:
            profile_paths(data, 100_000, 20_000, 200)
            return 0

        bench = Bench(plan, data)
        if args.cases:
            wanted = args.cases.split(",")
            unknown = set(wanted) - {c.id for c in bench.cases}
            if unknown:
                known = ", ".join(OPS)
                p.error(f"--cases: no such case {', '.join(sorted(unknown))}; known: {known}")
            bench.cases = [c for c in bench.cases if c.id in wanted]
            log(f"measuring: {plan.rounds} rounds (+1 warm-up) of {', '.join(wanted)}")
            bench.run(log)
            print(focus_table(bench.cases))
            return 0
        log(f"measuring: {plan.rounds} rounds (+1 warm-up) of {len(bench.cases)} cases")
        bench.run(log)
        log(f"commit-to-drop latency: {plan.latency_samples} writes, idle then busy listener")
        latency = {busy: commit_to_drop(plan.latency_samples, busy, log) for busy in (0, 2)}
        from benchmarks.idle import format_result as format_idle
        from benchmarks.idle import measure_idle

        n_idle, idle_seconds = (4, 2.0) if args.quick else (64, 10.0)
        log(f"idle cost: {n_idle} processes for {idle_seconds:g} s on a private redis-server")
        idle = measure_idle(n_idle, idle_seconds)
        log("  " + format_idle(idle))
        from benchmarks.size import format_result as format_size
        from benchmarks.size import measure_dashboard

        log("dashboard at size: a million unrelated keys on a private redis-server")
        at_size = measure_dashboard(50_000 if args.quick else 1_000_000)
        log("  " + format_size(at_size))
        cluster = measure_cluster(args.quick, log)
        memory: dict[int, dict[str, Any]] = {}
        for size, pks in zip(plan.memory_sizes, data.memory, strict=True):
            log(f"L1 memory at {size:,} entries (tracemalloc)")
            memory[size] = l1_bytes_per_entry(pks)

        meta = machine()
        meta.update(
            mode="quick" if args.quick else "full", rounds=plan.rounds, users=len(data.users)
        )
        rows = build_rows(bench.cases, latency, memory, plan)
        print(
            f"tiered_cache benchmark, {meta['date']}: {meta['host']}, {meta['cores']} cores "
            f"({meta['cpu']}), load {meta['load'][0]:.2f}; Python {meta['python']}, "
            f"Django {meta['django']}, PostgreSQL {meta['postgresql']} and Redis "
            f"{meta['redis']} on loopback; {meta['mode']} run, {plan.rounds} rounds."
        )
        print(render(rows))
        print(
            "median µs: median over rounds of the mean time of one operation in a round; "
            "ratios: median over rounds of the ratio within a round."
        )
        off = [r for r in rows if r["off_tier"]]
        if off:
            print(
                "* read another tier than the case names, in "
                + ", ".join(f"{r['case'].strip()} ({r['off_tier']} reads)" for r in off)
                + ": the bus lost trust or an entry expired meanwhile."
            )
        for busy, res in latency.items():
            if res["missed"] or res["still_in_l1"]:
                print(
                    f"commit-to-drop ({busy} busy threads): {res['missed']} writes not "
                    f"dropped within 5 s, {res['still_in_l1']} left the row in L1."
                )
        print(
            "Idle cost (targets: <= 1 Redis command/s and <= 0.1 % of a core per idle "
            "process; <= 5 heartbeats/s while reading): " + format_idle(idle) + "."
        )
        print(
            "Operations at size (target: the dashboard under 250 ms): " + format_size(at_size) + "."
        )
        print(
            "Redis Cluster (targets: each master within 5 points of a third of one model's "
            "entries; the bus on sharded pub/sub): " + format_cluster(cluster)
        )
        missed = [r["case"].strip() for r in rows if r["result"] == "MISS"]
        print(
            f"{len([r for r in rows if r['result'] == 'PASS'])} targets met, "
            f"{len(missed)} missed" + (f": {', '.join(missed)}." if missed else ".")
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    _json_safe(
                        {
                            "meta": meta,
                            "rows": rows,
                            "samples_us": {c.id: c.samples for c in bench.cases},
                            "commit_to_drop": latency,
                            "idle": idle,
                            "size": at_size,
                            "cluster": cluster,
                            "l1_memory": memory,
                        }
                    ),
                    f,
                    indent=2,
                )
            log(f"wrote {args.json}")
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        try:
            from tiered_cache.bus import bus
            from tiered_cache.tiers.remote import redis_tier

            redis_tier.wait_for_fills(10)
            bus.stop()
            n = delete_redis_keys(prefix)
            log(f"deleted {n:,} Redis keys of prefix {prefix}")
        except Exception:
            traceback.print_exc()
            status = 1
        if created and not args.keep_db:
            try:
                recreate_database(create=False)
                log(f"dropped database {args.db}")
            except Exception:
                traceback.print_exc()
                status = 1
    log("done")
    return status


if __name__ == "__main__":
    sys.exit(main())
