"""`manage.py tiered_cache inspect` and tiered_cache.inspection: what each tier holds for one
lookup, whether a read would be served and why not, checked against states made by real
reads and writes (and by tampering with Redis the way a bug, an eviction or an attacker
would); and that inspecting changes nothing. These tests commit."""

from __future__ import annotations

import json
import re
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client

import tiered_cache
from tests.cache_fixtures import write_outside_django
from tests.ops_helpers import change_behind_the_cache, read
from tests.testapp.factories import (
    AccountFactory,
    FlowFactory,
    ProviderModelFactory,
    UserFactory,
)
from tests.testapp.models import Account, Flow, ProviderModel, User
from tiered_cache import inspection
from tiered_cache.breaker import breaker
from tiered_cache.bus import bus
from tiered_cache.conf import conf
from tiered_cache.keys import RowHeader, split_header
from tiered_cache.registry import first_model_cache
from tiered_cache.serialization import MAC_SIZE, sign
from tiered_cache.tiers import local_tier, redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]


def run(*args: str) -> str:
    out = StringIO()
    call_command("tiered_cache", "inspect", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def run_json(*args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run(*args, "--json"))
    return data


def section(out: str, title: str) -> str:
    """One block of the human output ("L1 (this process)", "L2 (Redis)", "Database")."""
    blocks = out.split("\n\n")
    found = [b for b in blocks if b.startswith(title)]
    assert found, f"no {title!r} block in:\n{out}"
    return found[0]


def l2_key(model: Any, **lookup: Any) -> str:
    key = inspection.inspect_entry(model, lookup).l2_key
    assert key is not None
    return key


def row_version_key(model: Any, key: str, pk: Any) -> str:
    mc = first_model_cache(model)
    assert mc is not None
    return mc.home.shard_of(key).row_key(mc.row_id_of(pk))


# -- what a read leaves behind -----------------------------------------------------------


def test_a_row_just_read_is_served_from_l1_and_matches_the_database() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)

    out = run("testapp.User", f"pk={user.pk}")

    lines = out.splitlines()
    assert lines[0] == f"testapp.User pk={user.pk} (manager objects, database default)"
    assert lines[1] == "Would be served: yes, from L1 (this process)"
    assert lines[2] == "Bus in this process: live"
    l1 = section(out, "L1 (this process)")
    assert f"a row (pk {user.pk})" in l1 and "state     valid" in l1
    assert "database  same as this entry" in l1
    l2 = section(out, "L2 (Redis)")
    assert f"a row (pk {user.pk}, row id " in l2
    assert "(Redis PTTL); MAC-covered expiry in " in l2
    assert "(same)" in l2.split("generation")[1].splitlines()[0]
    assert "MAC          valid" in l2 and "state        valid" in l2
    db = section(out, "Database")
    assert f"objects.get(pk={user.pk}) on default" in db and f"a row (pk {user.pk})" in db

    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["served"] is True and data["served_from"] == "L1" and data["reason"] is None
    assert data["lookup"] == {"pk": user.pk}
    for tier in ("l1", "l2"):
        t = data[tier]
        assert t["held"] and t["valid"] and t["kind"] == "row" and t["pk"] == user.pk
        assert t["matches_database"] is True and t["differs"] == []
        assert 0 <= t["age"] < 30
        assert t["values"]["email"] == user.email
    assert 3500 < data["l2"]["ttl"] <= 3600  # TIMEOUT
    assert 250 < data["l1"]["ttl"] <= 300  # L1_TIMEOUT
    assert data["l2"]["generation"] == data["l2"]["header_generation"]
    assert data["l2"]["row_version"] == data["l2"]["header_version"]
    assert data["l2"]["mac"] == "valid"
    assert data["l2"]["memory_bytes"] > 0
    assert data["database_row"]["exists"] and data["database_row"]["values"]["id"] == user.pk


def test_values_are_normalized_as_get_cached_does() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    # "007" is what pk=7 is to the ORM: the same entry.
    data = run_json("testapp.User", f"id=00{user.pk}")
    assert data["lookup"] == {"pk": user.pk} and data["served_from"] == "L1"


def test_any_declared_lookup_composite_and_foreign_keys() -> None:
    user = UserFactory()
    flow = FlowFactory()
    offer = ProviderModelFactory()
    read(User.objects, email=user.email)
    read(Flow.objects, tenant_id=flow.tenant_id, session_id=flow.session_id)
    read(ProviderModel.objects, provider=offer.provider, global_model=offer.global_model)

    assert run_json("testapp.User", f"email={user.email}")["served_from"] == "L1"
    data = run_json("testapp.Flow", f"session_id={flow.session_id}", f"tenant_id={flow.tenant_id}")
    assert data["served_from"] == "L1"
    assert data["lookup"] == {"tenant_id": flow.tenant_id, "session_id": flow.session_id}
    data = run_json(
        "testapp.ProviderModel",
        f"provider={offer.provider_id}",
        f"global_model_id={offer.global_model_id}",
    )
    assert data["served_from"] == "L1" and data["l2"]["pk"] == offer.pk


def test_a_manager_with_its_own_queryset_is_inspected_under_its_own_key() -> None:
    rich = AccountFactory(balance=500)
    poor = AccountFactory(balance=5)
    read(Account.rich, email=rich.email)
    with pytest.raises(Account.DoesNotExist):
        Account.rich.get_cached(email=poor.email)
    redis_tier.wait_for_fills()

    data = run_json("testapp.Account", f"email={rich.email}", "--manager", "rich")
    assert data["manager"] == "rich" and data["served_from"] == "L1"
    assert "~" in data["l2_key"], "the manager's filter is part of the key"
    # The plain manager's entry of the same row was never filled.
    assert run_json("testapp.Account", f"email={rich.email}")["reason"] == "not_cached"
    # Through `rich`, the poor account is absent, which is what the database says too.
    data = run_json("testapp.Account", f"email={poor.email}", "--manager", "rich")
    assert data["served_from"] == "L1" and data["l1"]["kind"] == "no such row"
    assert data["l1"]["matches_database"] is True and not data["database_row"]["exists"]


def test_l2_only_after_this_process_dropped_its_l1() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    tiered_cache.clear_local()

    out = run("testapp.User", f"pk={user.pk}")

    assert "Would be served: yes, from L2 (Redis)" in out
    assert "holds  nothing" in section(out, "L1 (this process)")
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["served_from"] == "L2"
    assert not data["l1"]["held"] and data["l1"]["reason"] == "not_cached"


def test_l1_only_when_redis_lost_the_entry() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    redis_tier.client.delete(l2_key(User, pk=user.pk))

    data = run_json("testapp.User", f"pk={user.pk}")

    assert data["served_from"] == "L1"
    assert not data["l2"]["held"] and data["l2"]["reason"] == "not_cached"
    tiered_cache.clear_local()
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["served"] is False and data["reason"] == "not_cached"
    assert data["verdict"] == "no — not cached (nothing is stored under this key)"


def test_nothing_cached_yet() -> None:
    user = UserFactory()
    out = run("testapp.User", f"email={user.email}")
    assert "Would be served: no — not cached (nothing is stored under this key)" in out
    assert f"a row (pk {user.pk})" in section(out, "Database")


# -- stale entries -------------------------------------------------------------------------


def test_raw_sql_write_changes_the_row_version() -> None:
    user = UserFactory(first_name="old")
    read(User.objects, pk=user.pk)
    with connection.cursor() as cursor:  # seen: Django's connection
        cursor.execute("UPDATE testapp_user SET first_name = %s WHERE id = %s", ["new", user.pk])

    out = run("testapp.User", f"pk={user.pk}")

    assert "Would be served: no — row version changed (the row was written" in out
    l2 = section(out, "L2 (Redis)")
    assert "database     differs: first_name" in l2
    assert "state        row version changed" in l2
    assert "first_name  cached 'old', database 'new'" in section(out, "Database")
    # L1 was dropped by the write; the row version moved on in Redis.
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["reason"] == "row_version_changed" and not data["l1"]["held"]
    assert data["l2"]["row_version"] != data["l2"]["header_version"]
    assert data["l2"]["differs"] == ["first_name"] and data["l2"]["matches_database"] is False


def test_a_bumped_row_version_and_a_lost_one() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    key = l2_key(User, pk=user.pk)
    rv = row_version_key(User, key, user.pk)
    redis_tier.client.set(rv, "someone-else", keepttl=True)

    # This process's L1 did not hear of it (no bus message): it still serves the row.
    assert run_json("testapp.User", f"pk={user.pk}")["served_from"] == "L1"
    tiered_cache.clear_local()
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["served"] is False and data["reason"] == "row_version_changed"
    assert data["l2"]["row_version"] == "someone-else"

    redis_tier.client.delete(rv)
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["reason"] == "row_version_missing" and data["l2"]["row_version"] is None
    # The read agrees: a miss, and a fill of the current row.
    User.objects.get_cached(pk=user.pk)
    redis_tier.wait_for_fills()
    assert run_json("testapp.User", f"pk={user.pk}")["served"] is True


def test_a_write_outside_django_is_served_but_differs_from_the_database() -> None:
    user = UserFactory(first_name="old")
    read(User.objects, pk=user.pk)
    change_behind_the_cache(user, "new")

    out = run("testapp.User", f"pk={user.pk}")

    assert "Would be served: yes, from L1 (this process)" in out
    assert "database  differs: first_name" in section(out, "L1 (this process)")
    assert "first_name  cached 'old', database 'new'" in section(out, "Database")


def test_a_flush_changes_the_generation() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    User.objects.flush_cache()

    data = run_json("testapp.User", f"pk={user.pk}")

    assert data["served"] is False and data["reason"] == "generation_changed"
    assert data["l2"]["generation"] != data["l2"]["header_generation"]
    # L1 keeps the entry until it is looked up; its flush epoch moved on.
    assert data["l1"]["held"] and data["l1"]["reason"] == "generation_changed"
    assert data["l1"]["flush_epoch"] != data["l1"]["current_flush_epoch"]


def test_a_lost_generation() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    tiered_cache.clear_local()
    key = l2_key(User, pk=user.pk)
    mc = first_model_cache(User)
    assert mc is not None
    gen_key = mc.home.shard_of(key).gen_key
    redis_tier.client.delete(gen_key)

    data = run_json("testapp.User", f"pk={user.pk}")

    assert data["reason"] == "generation_missing" and data["l2"]["generation"] is None
    assert redis_tier.client.exists(gen_key) == 0, "inspecting made no generation"


# -- negative entries -------------------------------------------------------------------


def test_a_remembered_absence_and_the_write_that_ends_it() -> None:
    missing = UserFactory().pk + 1000
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=missing)
    redis_tier.wait_for_fills()

    out = run("testapp.User", f"pk={missing}")
    assert "Would be served: yes, from L1 (this process)" in out
    for title in ("L1 (this process)", "L2 (Redis)"):
        block = section(out, title)
        assert "no such row" in block and "has no such row either" in block
    assert "write count  entry " in section(out, "L2 (Redis)")
    data = run_json("testapp.User", f"pk={missing}")
    assert data["l2"]["kind"] == "no such row" and data["l2"]["valid"]
    assert data["l2"]["header_version"] == data["l2"]["writes"]
    assert 0 < data["l2"]["ttl"] <= 60  # NEGATIVE_TIMEOUT

    UserFactory()  # any INSERT of the model ends every "no such row" of it

    data = run_json("testapp.User", f"pk={missing}")
    assert data["served"] is False and data["reason"] == "negative_invalidated"
    assert data["verdict"].startswith("no — negative entry invalidated by a write")
    assert data["l1"]["reason"] == "negative_invalidated"
    assert data["l2"]["reason"] == "negative_invalidated"


def test_a_remembered_absence_of_a_row_that_exists_now() -> None:
    user = UserFactory()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="later@example.com")
    redis_tier.wait_for_fills()
    write_outside_django(
        "UPDATE testapp_user SET email = %s WHERE id = %s", ["later@example.com", user.pk]
    )

    data = run_json("testapp.User", "email=later@example.com")

    assert data["served_from"] == "L1" and data["l1"]["kind"] == "no such row"
    assert data["l1"]["matches_database"] is False and data["database_row"]["exists"]


# -- what Redis may hold besides our entries ----------------------------------------------


def test_a_tampered_payload_is_corrupt() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    tiered_cache.clear_local()
    key = l2_key(User, pk=user.pk)
    raw = redis_tier.client.get(key)
    redis_tier.client.set(key, raw[:-1] + bytes([raw[-1] ^ 1]), keepttl=True)

    data = run_json("testapp.User", f"pk={user.pk}")

    assert data["served"] is False and data["reason"] == "corrupt"
    assert data["l2"]["mac"] == "payload MAC does not match"
    assert data["verdict"] == (
        "no — corrupt (the stored value fails its MAC or does not decode (a read deletes "
        "it); payload MAC does not match)"
    )
    assert redis_tier.client.get(key) is not None, "inspecting deleted nothing"

    redis_tier.client.delete(key)
    redis_tier.client.sadd(key, "junk")
    try:
        data = run_json("testapp.User", f"pk={user.pk}")
        assert data["reason"] == "corrupt" and data["l2"]["held"]
        assert "a key of another type" in data["verdict"]
    finally:
        redis_tier.client.delete(key)  # junk a GET of later tests' helpers would trip on


def test_an_entry_past_the_expiry_its_mac_covers() -> None:
    """An old authentic entry put back with a fresh Redis TTL (a replica's, a restore):
    its header's expiry is signed, and past."""
    user = UserFactory()
    read(User.objects, pk=user.pk)
    tiered_cache.clear_local()
    key = l2_key(User, pk=user.pk)
    raw = redis_tier.client.get(key)
    split = split_header(raw, len(RowHeader._fields))
    assert split is not None
    fields, rest = split
    old = RowHeader(*fields)._replace(expires=b"1000000000")
    header = b"|".join([*old, b""])
    redis_tier.client.set(key, sign(key, header, rest[MAC_SIZE:]), keepttl=True)

    out = run("testapp.User", f"pk={user.pk}")

    assert "Would be served: no — expired (" in out
    l2 = section(out, "L2 (Redis)")
    assert "MAC-covered expiry " in l2 and "s ago (2001-09-09 01:46:40 UTC)" in l2
    assert "MAC          valid" in l2


# -- the bus ------------------------------------------------------------------------------


def test_a_process_whose_bus_is_not_trusted_serves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    monkeypatch.setattr(bus, "ensure_started", lambda wait=None: None)
    monkeypatch.setattr(bus, "trusted_until", 0.0)

    data = run_json("testapp.User", f"pk={user.pk}")

    assert data["served"] is False and data["reason"] == "bus_not_trusted"
    assert data["l1"]["valid"] and data["l2"]["valid"], "the entries themselves are fine"
    assert "the bus is connected" in data["verdict"]


# -- read-only -----------------------------------------------------------------------------


# Statistics, process lists, hot rows and trends: the stats publisher's thread (started by
# earlier tests) may push them at any moment; they are not tiers.
_STATS = re.compile(rb"\}:(s|p|hot|t):")


def _redis_state() -> dict[bytes, tuple[bytes | None, int]]:
    """Every key of this run but statistics: its DUMP and its TTL left (ms)."""
    from django.conf import settings

    client = redis_tier.client
    keys = sorted(client.scan_iter(match=f"*{settings.TEST_KEY_PREFIX}*", count=1000))
    return {k: (client.dump(k), client.pttl(k)) for k in keys if not _STATS.search(k)}


def test_inspecting_changes_no_tier() -> None:
    users = UserFactory.create_batch(3)
    for u in users:
        read(User.objects, pk=u.pk)
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=users[-1].pk + 100)
    redis_tier.wait_for_fills()
    before_l1 = list(local_tier._data.items())
    before = _redis_state()
    started = time.monotonic()

    for u in users:
        run("testapp.User", f"pk={u.pk}")
        run("testapp.User", f"email={u.email}")  # not cached: no lease, no fill
    run("testapp.User", f"pk={users[-1].pk + 100}")
    run("testapp.User", f"pk={users[-1].pk + 200}")
    redis_tier.wait_for_fills()

    assert list(local_tier._data.items()) == before_l1, "L1 is untouched, LRU order too"
    after = _redis_state()
    assert after.keys() - before.keys() == set(), "no key made (no lease, no fill)"
    # Keys may expire meanwhile: the reads' leases, a row version a lease made (2 s).
    lasting = (time.monotonic() - started) * 1000 + 1000
    for key, (dump, ttl) in before.items():
        if ttl == -1 or ttl > lasting:
            assert key in after, f"{key!r} was deleted"
            assert after[key][0] == dump, f"{key!r} was changed"


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["testapp.User", "pk"], r"malformed lookup 'pk': write field=value"),
        (["testapp.User", "=1"], r"malformed lookup '=1'"),
        (["testapp.User", "pk=1", "pk=2"], r"the lookup names 'pk' twice"),
        (
            ["testapp.User", "first_name=Ann"],
            r"testapp\.user: \(first_name\) is not a declared cache lookup; declared lookups "
            r"are \(pk\), \(email\)",
        ),
        (
            ["testapp.Flow", "tenant_id=t1"],
            r"\(tenant_id\) is not a declared cache lookup; declared lookups are \(pk\), "
            r"\(tenant_id, session_id\)",
        ),
        (
            ["testapp.User", "pk=abc"],
            r"testapp\.user: malformed value in pk=abc: Field 'id' expected a number but got "
            r"'abc'",
        ),
        (["testapp.Flow", "pk=1.5"], r"malformed value in pk=1\.5"),
        (
            ["testapp.User", "pk=1", "--manager", "nope"],
            r"testapp\.User has no cached manager 'nope'; its cached managers: objects",
        ),
        (["testapp.User", "pk=1", "--database", "nope"], r"no database 'nope'; databases: "),
        (["testapp.Nope", "pk=1"], r"'testapp\.Nope': no such model is installed"),
        (["testapp.PlainFlow", "pk=1"], r"testapp\.PlainFlow is not cached"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_a_lookup_is_required() -> None:
    with pytest.raises(CommandError, match="the following arguments are required"):
        call_command("tiered_cache", "inspect", "testapp.User", stderr=StringIO())


def test_lookup_words_from_one_string() -> None:
    assert inspection.parse_lookup("tenant_id=t1 session_id='a b'") == {
        "tenant_id": "t1",
        "session_id": "a b",
    }
    assert inspection.parse_lookup(["email="]) == {"email": ""}
    with pytest.raises(inspection.CannotInspect, match="no lookup given"):
        inspection.parse_lookup("  ")
    with pytest.raises(inspection.CannotInspect, match="malformed lookup .*No closing quotation"):
        inspection.parse_lookup("session_id='a b")


def test_a_binary_lookup_is_typed_as_hex() -> None:
    from tests.testapp.models import Ledger

    row = Ledger.objects.create(amount=1, digest=bytes.fromhex("00ff10"))
    Ledger.objects.get_cached(digest=row.digest)
    report = inspection.inspect_entry("testapp.Ledger", "digest=00ff10")
    assert report.served and report.served_from == "L1" and report.l1.pk == row.pk
    with pytest.raises(inspection.CannotInspect, match="digest is binary: give its value as hex"):
        inspection.inspect_entry("testapp.Ledger", "digest=zz")


# -- the dashboard's form ---------------------------------------------------------------

DASHBOARD = "/admin/tiered_cache/pendinginvalidation/dashboard/"


def staff_with(*perms: str) -> User:
    from django.contrib.auth.models import Permission

    user = UserFactory(is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return User.objects.get(pk=user.pk)


def inspect_page(client: Client, label: str, lookup: str) -> str:
    response = client.get(DASHBOARD, {"inspect": label, "lookup": lookup})
    assert response.status_code == 200
    return response.content.decode()


def test_the_form_shows_each_tier(client: Client) -> None:
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    user = UserFactory(first_name="old")
    read(User.objects, pk=user.pk)
    change_behind_the_cache(user, "new")

    page = inspect_page(client, "testapp.User", f"pk={user.pk}")

    verdict = re.search(r'<p id="tc-inspect-verdict">(.*?)</p>', page, re.S)
    assert verdict, "no verdict"
    text = " ".join(re.sub(r"<[^>]+>", "", verdict.group(1)).split())
    assert f"testapp.User pk={user.pk}" in text
    assert "Would be served: yes, from L1 (this process)" in text
    l1 = re.search(r'<tr id="tc-inspect-l1"([^>]*)>', page)
    l2 = re.search(r'<tr id="tc-inspect-l2"([^>]*)>', page)
    assert l1 and 'data-held="yes" data-valid="yes" data-served="yes"' in l1.group(1)
    assert l2 and 'data-held="yes" data-valid="yes" data-served="no"' in l2.group(1)
    assert "MAC-covered expiry" in page
    diffs = re.search(r'<td class="tc-inspect-diffs">(.*?)</td>', page, re.S)
    assert (
        diffs
        and "<code>first_name</code>: cached &#x27;old&#x27;, database &#x27;new&#x27;"
        in (diffs.group(1))
    )
    assert '<option value="testapp.User" selected>' in page
    assert f'value="pk={user.pk}"' in page


def test_the_form_reports_a_bad_lookup(client: Client) -> None:
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    page = inspect_page(client, "testapp.Flow", "tenant_id=t1")
    error = re.search(r'<p class="errornote" id="tc-inspect-error">(.*?)</p>', page, re.S)
    assert error and "(tenant_id) is not a declared cache lookup" in error.group(1)
    assert 'id="tc-inspect-verdict"' not in page
    page = inspect_page(client, "testapp.PlainFlow", "pk=1")
    assert "testapp.PlainFlow is not cached" in page
    page = inspect_page(client, "testapp.User", "pk=x")
    assert "malformed value in pk=x" in page


def test_the_form_needs_the_models_view_permission(client: Client) -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    client.force_login(staff_with("testapp.view_flow"))

    page = client.get(DASHBOARD).content.decode()
    options = re.findall(r'<option value="([^"]+)"', page)
    assert options == ["testapp.Flow"]

    response = client.get(DASHBOARD, {"inspect": "testapp.User", "lookup": f"pk={user.pk}"})
    assert response.status_code == 403
    flow = FlowFactory()
    page = inspect_page(
        client, "testapp.Flow", f"tenant_id={flow.tenant_id} session_id={flow.session_id}"
    )
    assert "Would be served: <strong" in page and "no — not cached" in page

    client.force_login(staff_with())  # staff, no model: no form at all
    assert 'id="tc-inspect-form"' not in client.get(DASHBOARD).content.decode()


def test_redis_unavailable_is_part_of_the_answer() -> None:
    user = UserFactory()
    read(User.objects, pk=user.pk)
    for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
        breaker.failure()

    # L1 still serves (the bus vouches for it); L2 cannot be read.
    data = run_json("testapp.User", f"pk={user.pk}")
    assert data["served_from"] == "L1"
    assert data["l2"]["reason"] == "redis_unavailable" and not data["l2"]["held"]

    tiered_cache.clear_local()
    out = run("testapp.User", f"pk={user.pk}")
    assert "Would be served: no — Redis unavailable (Redis could not be read; circuit open)" in (
        out
    )
    assert "unknown: Redis could not be read (circuit open)" in section(out, "L2 (Redis)")
    assert f"a row (pk {user.pk})" in section(out, "Database")
