"""Cached functions with model dependencies (tiered_cache.cached)."""

from __future__ import annotations

import datetime
import enum
import threading
import time
import zoneinfo
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

import tiered_cache
from tests.cache_fixtures import write_outside_django
from tests.processes import wait_for, worker
from tests.testapp.factories import (
    FlowFactory,
    GlobalModelFactory,
    ProviderFactory,
    ProviderModelFactory,
    UserFactory,
)
from tests.testapp.models import Flow, GlobalModel, Label, ProviderModel, Tenant, User
from tiered_cache import UncacheableArguments, cached
from tiered_cache.bus import bus
from tiered_cache.keys import fn_tag
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

calls: list[Any] = []


@cached(depends_on=[User], timeout=60, negative_timeout=0.3)
def user_names(domain: str, active: bool = True) -> list[str] | None:
    calls.append(domain)
    names = sorted(
        User.objects.filter(email__endswith="@" + domain, is_active=active).values_list(
            "username", flat=True
        )
    )
    return names or None


@cached(depends_on=["testapp.User"])
def first_user(domain: str) -> User | None:
    calls.append(domain)
    return User.objects.filter(email__endswith="@" + domain).order_by("pk").first()


@pytest.fixture(autouse=True)
def reset_calls() -> None:
    calls.clear()
    # The first test of a process starts the bus: until it is trusted a result is computed
    # again (correctly), which these tests would count as a miss.
    bus.wait_trusted(5)


def test_result_is_cached_in_both_tiers() -> None:
    UserFactory(username="ann", email="ann@x.test")
    assert user_names("x.test") == ["ann"]
    assert user_names("x.test") == ["ann"]
    tiered_cache.clear_local()
    assert user_names("x.test") == ["ann"]
    assert calls == ["x.test"]


def test_positional_keyword_and_default_arguments_share_a_key() -> None:
    UserFactory(email="b@y.test")
    user_names("y.test")
    user_names(domain="y.test")
    user_names("y.test", True)
    user_names("y.test", active=True)
    assert calls == ["y.test"]


@pytest.mark.parametrize(
    "write",
    [
        lambda u: (setattr(u, "username", "changed"), u.save()),
        lambda u: User.objects.filter(pk=u.pk).update(username="changed"),
        lambda u: User.objects.bulk_update([setattr(u, "username", "changed") or u], ["username"]),
        lambda u: (u.delete(), UserFactory(username="changed", email="c@z.test")),
        lambda u: (
            User.objects.filter(pk=u.pk).update(username="changed"),
            User.objects.flush_cache(),
        ),
    ],
    ids=["save", "update", "bulk_update", "delete+create", "flush"],
)
def test_any_write_of_a_dependency_drops_the_result(write: Any) -> None:
    user = UserFactory(username="before", email="c@z.test")
    assert user_names("z.test") == ["before"]
    write(user)
    assert user_names("z.test") == ["changed"]
    tiered_cache.clear_local()
    assert user_names("z.test") == ["changed"]


def test_writes_of_other_models_do_not_drop_it() -> None:
    UserFactory(email="d@w.test")
    user_names("w.test")
    GlobalModelFactory()
    user_names("w.test")
    assert calls == ["w.test"]


def test_none_is_kept_for_the_negative_timeout() -> None:
    assert user_names("nobody.test") is None
    assert user_names("nobody.test") is None
    assert calls == ["nobody.test"]
    time.sleep(0.35)
    tiered_cache.clear_local()
    assert user_names("nobody.test") is None
    assert calls == ["nobody.test", "nobody.test"]


def test_model_instances_come_back_as_fresh_copies() -> None:
    UserFactory(email="e@v.test", preferences={"a": 1})
    got = first_user("v.test")
    got.preferences["a"] = 2
    got.first_name = "mutated"
    again = first_user("v.test")
    assert again.preferences == {"a": 1} and again.first_name != "mutated"
    assert again is not got


def test_invalidate_drops_one_entry_everywhere() -> None:

    UserFactory(email="f@u.test")
    t_user = UserFactory(username="t_before", email="g@t.test")
    user_names("u.test")
    user_names("t.test")
    user_names.invalidate("u.test")
    user_names("u.test")
    user_names("t.test")
    assert calls == ["u.test", "t.test", "u.test"]
    with worker() as other:
        assert other.call("tests.test_derived.call_user_names", "t.test") == ["t_before"]
        write_outside_django(  # behind the cache's back
            f"UPDATE {User._meta.db_table} SET username = 't_after' WHERE id = %s", [t_user.pk]
        )
        assert other.call("tests.test_derived.call_user_names", "t.test") == ["t_before"]
        user_names.invalidate("t.test")
        time.sleep(0.1)
        assert other.call("tests.test_derived.call_user_names", "t.test") == ["t_after"]


def call_user_names(domain: str) -> Any:
    return user_names(domain)


def test_unkeyable_arguments_raise_type_error_at_call_time() -> None:
    with pytest.raises(UncacheableArguments) as exc:
        user_names(object())
    assert isinstance(exc.value, TypeError)
    assert "argument 'domain'" in str(exc.value) and "object" in str(exc.value)
    with pytest.raises(TypeError, match="unexpected keyword"):
        user_names("x", colour="red")
    with pytest.raises(UncacheableArguments, match="unsaved"):
        first_user(User(username="unsaved"))


def test_a_dependency_write_during_the_computation_is_not_stored(monkeypatch: Any) -> None:
    user = UserFactory(username="old", email="h@s.test")
    computing, go_on = threading.Event(), threading.Event()
    original = user_names.fn

    def slow(domain: str, active: bool = True) -> Any:
        result = original(domain, active)
        computing.set()
        go_on.wait(5)
        return result

    monkeypatch.setattr(user_names, "fn", slow)
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(user_names("s.test")))
    t.start()
    assert computing.wait(5)
    User.objects.filter(pk=user.pk).update(username="new")
    go_on.set()
    t.join(5)
    assert out == [["old"]]  # the caller gets what it computed...
    monkeypatch.setattr(user_names, "fn", original)
    assert user_names("s.test") == ["new"]  # ...but nothing stale was stored
    tiered_cache.clear_local()
    assert user_names("s.test") == ["new"]


def test_a_dependency_write_in_one_process_drops_the_result_in_another() -> None:
    provider = ProviderFactory()
    gm = GlobalModelFactory(name="gpt-x")
    ProviderModelFactory(provider=provider, global_model=gm, provider_model_name="alias-x")
    with worker() as other:
        assert other.call("tests.process_tasks.resolve", "alias-x") == "gpt-x"
        assert other.call("tests.process_tasks.resolve", "alias-x") == "gpt-x"
        ProviderModel.objects.filter(provider_model_name="alias-x").update(is_active=False)
        time.sleep(0.1)
        assert other.call("tests.process_tasks.resolve", "alias-x") is None
        GlobalModel.objects.filter(pk=gm.pk).update(name="alias-x")
        time.sleep(0.1)
        assert other.call("tests.process_tasks.resolve", "alias-x") == "alias-x"


def test_derived_entries_live_in_one_hash_slot() -> None:
    UserFactory(email="i@r.test")
    user_names("r.test")

    redis_tier.wait_for_fills()
    keys = list(redis_tier.client.scan_iter(match=fn_tag().replace("[", "[[]") + "*", count=1000))
    assert keys
    assert {k.split(b"}")[0] for k in keys} == {keys[0].split(b"}")[0]}


@cached(depends_on=[Flow])
def step_of(pk: int) -> int:
    return int(Flow.objects.get(pk=pk).current_step)


def test_a_write_in_a_process_that_never_imported_the_function_drops_its_results() -> None:
    """A Celery worker or a management command writes without ever importing the module
    that defines the function: the write still reaches the function's results, in both
    tiers of every process."""
    flow = FlowFactory(current_step=1)
    assert step_of(flow.pk) == 1
    assert step_of(flow.pk) == 1  # cached
    with worker() as other:
        assert not other.call("tests.process_tasks.imported", __name__)
        assert other.call("tests.coherence_tasks.write_one", flow.pk, "update") == 2
        assert not other.call("tests.process_tasks.imported", __name__)
    assert wait_for(lambda: step_of(flow.pk) == 2, 2)
    tiered_cache.clear_local()
    assert step_of(flow.pk) == 2


# -- what a review found (each failed before) -----------------------------------------------


@cached(depends_on=[Label])
def label_pk(name: str) -> int:
    calls.append(name)
    return Label.objects.get_or_create(name=name)[0].pk


def test_a_function_that_writes_its_dependency_in_a_rolled_back_block_stores_nothing() -> None:
    """Its write is the caller's transaction's: the result holds an uncommitted row, which
    must reach no tier (guarantee 3)."""
    with pytest.raises(RuntimeError), transaction.atomic():
        label_pk("ghost")
        raise RuntimeError
    tiered_cache.clear_local()
    pk = label_pk("ghost")
    assert Label.objects.filter(pk=pk).exists()
    assert calls == ["ghost", "ghost"]


def test_a_closure_or_lambda_made_twice_needs_a_name_of_its_own() -> None:
    def make(factor: int, name: str | None = None) -> Any:
        @cached(depends_on=[User], name=name)
        def scaled(x: int) -> int:
            return x * factor

        return scaled

    double = make(2)
    try:
        assert make(2) is not double  # made again from the same value: it replaces it
        with pytest.raises(ImproperlyConfigured, match="defined twice"):
            make(3)
        triple = make(3, name="triple")
        try:
            assert (double(5), triple(5)) == (10, 15)
        finally:
            triple.unregister()
    finally:
        double.unregister()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_a_write_on_another_database_drops_results() -> None:
    @cached(depends_on=[Tenant])
    def tenant_names(using: str) -> list[str]:
        return sorted(Tenant.objects.using(using).values_list("name", flat=True))

    try:
        Tenant.objects.using("other").create(name="o1")
        assert tenant_names("other") == ["o1"]
        Tenant.objects.using("other").create(name="o2")
        assert tenant_names("other") == ["o1", "o2"]
        tiered_cache.clear_local()
        assert tenant_names("other") == ["o1", "o2"]
    finally:
        tenant_names.unregister()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_arguments_that_differ_only_in_what_a_key_left_out_get_their_own_results() -> None:
    """An instance's database, a decimal's exponent, an enum's module, a datetime's zone: the
    function sees each apart, so its results must be kept apart."""
    Tenant.objects.create(pk=1, name="default-row")
    Tenant.objects.using("other").create(pk=1, name="other-row")
    first = enum.Enum("Status", {"OPEN": "open"}, module="app_one")
    second = enum.Enum("Status", {"OPEN": "open"}, module="app_two")
    paris = datetime.datetime(2026, 1, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    fixed = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone(timedelta(hours=1)))

    @cached(depends_on=[Tenant])
    def describe(value: Any) -> str:
        if isinstance(value, Tenant):
            return value.name
        if isinstance(value, enum.Enum):
            return type(value).__module__
        if isinstance(value, datetime.datetime):
            return str(value.tzname())
        if isinstance(value, int):  # too long for str() (4,300 digits at most)
            return str(value % 10)
        return str(value)

    try:
        pairs = [
            (Tenant.objects.get(pk=1), Tenant.objects.using("other").get(pk=1)),
            (Decimal("1"), Decimal("1.00")),
            (first.OPEN, second.OPEN),
            (paris, fixed),
            (10**5000, 10**5000 + 1),
            ({1, 2}, frozenset({1, 2})),
        ]
        for a, b in pairs:
            for value in (a, b, a, b):
                assert describe(value) == describe.fn(value), value
    finally:
        describe.unregister()


def test_a_timeout_of_zero_keeps_nothing_and_costs_redis_nothing(monkeypatch: Any) -> None:
    """It was sent as `SET ... PX 0`, an error Redis answers, which counted towards the
    breaker: a few threads calling it opened the breaker for every read of the process."""
    from tiered_cache.breaker import breaker

    failures: list[Any] = []
    counted = breaker.failure
    monkeypatch.setattr(breaker, "failure", lambda *a: failures.append(a) or counted(*a))

    @cached(depends_on=[User], negative_timeout=0)
    def nobody(domain: str) -> None:
        calls.append(domain)
        return None

    try:
        for _ in range(10):
            assert nobody("z.test") is None
        assert calls == ["z.test"] * 10
        assert failures == []
    finally:
        nobody.unregister()


def test_a_result_that_cannot_be_stored_is_returned(caplog: Any) -> None:
    @cached(depends_on=[User])
    def numbers(n: int) -> Any:
        return (i for i in range(n))

    try:
        assert list(numbers(3)) == [0, 1, 2]
        assert "cannot be stored" in caplog.text
    finally:
        numbers.unregister()


def test_wrong_arguments_are_refused_where_the_function_is_decorated() -> None:
    """They failed at the first call (after the function ran, for a timeout), or crashed
    the system checks, with errors about something else."""
    from django.core import checks

    from tests.testapp.models import BaseFlow

    cases: list[tuple[dict[str, Any], str]] = [
        ({"depends_on": "testapp.Tenant"}, r"is a string; did you mean depends_on=\['testapp"),
        ({"depends_on": None}, r"depends_on=None: give a list of models"),
        ({"depends_on": Tenant}, r"depends_on=<class .*Tenant'>: give a list of models"),
        ({"depends_on": []}, r"needs depends_on=\[Model, ...\]"),
        ({"depends_on": [1]}, r"depends_on holds 1, which is not a model or an 'app_label"),
        ({"depends_on": ["Tenant"]}, r"holds 'Tenant', which is not a model"),
        ({"depends_on": [Tenant.objects]}, r"holds <tiered_cache.*CachedManager"),
        ({"depends_on": [BaseFlow]}, r"holds BaseFlow, an abstract model"),
        ({"depends_on": [Tenant], "timeout": "10"}, r"timeout='10' must be a number of seconds"),
        ({"depends_on": [Tenant], "negative_timeout": -1}, r"negative_timeout=-1 must be"),
        ({"depends_on": [Tenant], "l1_timeout": float("inf")}, r"l1_timeout=inf must be"),
        ({"depends_on": [Tenant], "timeout": float("nan")}, r"timeout=nan must be"),
        ({"depends_on": [Tenant], "timeout": True}, r"timeout=True must be"),
        ({"depends_on": [Tenant], "l1_timeout": 10**9}, r"=1000000000 must be .* to under 10\*\*9"),
    ]
    for kwargs, message in cases:
        with pytest.raises(TypeError, match=message):

            @cached(**kwargs)
            def f(x: int) -> int:
                return x

    from fractions import Fraction

    @cached(depends_on=[Tenant], timeout=Fraction(1, 2), l1_timeout=0)
    def fine(x: int) -> int:
        return x

    fine.unregister()

    with pytest.raises(TypeError, match=r"@cached needs its arguments: @cached\(depends_on="):

        @cached  # type: ignore[arg-type]
        def g(x: int) -> int:
            return x

    # A label of no installed model: one clear error from the checks, which ran through.
    @cached(depends_on=["testapp.Nope"])
    def h(x: int) -> int:
        return x

    try:
        errors = [e for e in checks.run_checks() if e.id == "tiered_cache.E009"]
        assert [e.msg for e in errors] == [
            "@cached function tests.test_derived.test_wrong_arguments_are_refused_where_the_"
            "function_is_decorated.<locals>.h: depends_on names a model that is not installed "
            "(App 'testapp' doesn't have a 'nope' model.)"
        ]
    finally:
        h.unregister()
