"""Writes: read-your-writes (guarantee 1), transactions (guarantee 3) and every write path
of the default manager (guarantee 4). These tests really commit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

import tiered_cache
from tests.cache_fixtures import counters, in_thread, l2_keys, write_outside_django
from tests.testapp.factories import FlowFactory, UserFactory
from tests.testapp.models import Flow, Tenant, User

pytestmark = pytest.mark.django_db(transaction=True)


def warm(user: User) -> None:
    """Put the row in both tiers under both lookups."""
    User.objects.get_cached(pk=user.pk)
    User.objects.get_cached(email=user.email)


read_elsewhere = in_thread  # its own database connection, outside our transaction


# -- guarantee 1 -------------------------------------------------------------


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_save_in_autocommit_is_read_back(tier: str) -> None:
    user = UserFactory(first_name="old")
    warm(user)
    user.first_name = "new"
    user.save()
    if tier == "l2":
        tiered_cache.clear_local()
    assert User.objects.get_cached(pk=user.pk).first_name == "new"
    assert User.objects.get_cached(email=user.email).first_name == "new"


def test_delete_in_autocommit_is_read_back() -> None:
    user = UserFactory()
    warm(user)
    pk, email = user.pk, user.email
    user.delete()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=pk)
    tiered_cache.clear_local()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email=email)


def test_outermost_commit_is_read_back() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    with transaction.atomic():
        with transaction.atomic():
            User.objects.filter(pk=user.pk).update(first_name="new")
        # Not committed yet: another connection still reads the committed row.
        assert read_elsewhere(lambda: User.objects.get_cached(pk=user.pk).first_name) == "old"
    assert User.objects.get_cached(pk=user.pk).first_name == "new"
    tiered_cache.clear_local()
    assert User.objects.get_cached(email=user.email).first_name == "new"


# -- guarantee 3 -------------------------------------------------------------


def test_reads_in_a_dirty_block_see_its_writes_and_fill_nothing() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    fills = counters(User)["fills"]
    with transaction.atomic():
        user.first_name = "uncommitted"
        user.save()
        assert User.objects.get_cached(pk=user.pk).first_name == "uncommitted"
        assert User.objects.get_many_cached([user.pk])[user.pk].first_name == "uncommitted"
        assert read_elsewhere(lambda: User.objects.get_cached(pk=user.pk).first_name) == "old"
        assert counters(User)["fills"] == fills
        assert counters(User)["bypassed"] == 2
    assert User.objects.get_cached(pk=user.pk).first_name == "uncommitted"


def test_rollback_leaves_no_trace() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    before = counters(User)
    with pytest.raises(RuntimeError), transaction.atomic():
        user.first_name = "rolled back"
        user.save()
        User.objects.get_cached(pk=user.pk)
        raise RuntimeError
    after = counters(User)
    assert after["invalidations"] == before["invalidations"]
    assert after["fills"] == before["fills"]
    # Still served from L1: the rollback did not even drop the cached row.
    assert User.objects.get_cached(pk=user.pk).first_name == "old"
    assert counters(User)["l1_hits"] == before["l1_hits"] + 1


def test_a_block_that_wrote_other_models_still_uses_the_cache() -> None:
    user = UserFactory()
    warm(user)
    with transaction.atomic():
        FlowFactory()
        User.objects.get_cached(pk=user.pk)
    assert counters(User)["bypassed"] == 0


def test_rolled_back_savepoint_keeps_the_outer_invalidation() -> None:
    a, b = UserFactory(first_name="a0"), UserFactory(first_name="b0")
    warm(a)
    warm(b)
    with transaction.atomic():
        User.objects.filter(pk=a.pk).update(first_name="a1")
        with pytest.raises(RuntimeError), transaction.atomic():
            User.objects.filter(pk=b.pk).update(first_name="b1")
            raise RuntimeError
        User.objects.filter(pk=a.pk).update(last_name="still-outer")
    tiered_cache.clear_local()
    got_a = User.objects.get_cached(pk=a.pk)
    assert (got_a.first_name, got_a.last_name) == ("a1", "still-outer")
    assert User.objects.get_cached(pk=b.pk).first_name == "b0"


def test_a_write_in_a_savepoint_after_a_rolled_back_one_is_invalidated() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            User.objects.filter(pk=user.pk).update(first_name="gone")
            raise RuntimeError
        with transaction.atomic():
            User.objects.filter(pk=user.pk).update(first_name="new")
    assert User.objects.get_cached(pk=user.pk).first_name == "new"


# -- guarantee 4 -------------------------------------------------------------


def _save(u: User) -> None:
    u.first_name = "new"
    u.save()


def _save_update_fields(u: User) -> None:
    u.first_name = "new"
    u.save(update_fields=["first_name"])


def _queryset_update(u: User) -> None:
    User.objects.filter(email=u.email).update(first_name="new")


def _bulk_update(u: User) -> None:
    u.first_name = "new"
    User.objects.bulk_update([u], ["first_name"])


def _update_or_create(u: User) -> None:
    User.objects.update_or_create(pk=u.pk, defaults={"first_name": "new"})


def _related_manager_style(u: User) -> None:
    User.objects.all().filter(pk=u.pk).update(first_name="new")


def _unloaded_instance_save(u: User) -> None:
    fresh = User.objects.get(pk=u.pk)
    fresh.first_name = "new"
    fresh.save()


@pytest.mark.parametrize(
    "write",
    [
        _save,
        _save_update_fields,
        _queryset_update,
        _bulk_update,
        _update_or_create,
        _related_manager_style,
        _unloaded_instance_save,
    ],
)
@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_every_update_path_invalidates(write: Callable[[User], None], tier: str) -> None:
    user = UserFactory(first_name="old")
    warm(user)
    write(user)
    if tier == "l2":
        tiered_cache.clear_local()
    assert User.objects.get_cached(pk=user.pk).first_name == "new"
    assert User.objects.get_cached(email=user.email).first_name == "new"


def _delete(u: User) -> None:
    u.delete()


def _queryset_delete(u: User) -> None:
    User.objects.filter(pk=u.pk).delete()


@pytest.mark.parametrize("write", [_delete, _queryset_delete])
@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_every_delete_path_invalidates(write: Callable[[User], None], tier: str) -> None:
    user = UserFactory()
    warm(user)
    pk, email = user.pk, user.email
    write(user)
    if tier == "l2":
        tiered_cache.clear_local()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(pk=pk)
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email=email)


@pytest.mark.parametrize("how", ["bulk_create", "create", "get_or_create"])
def test_creates_end_remembered_absence(how: str) -> None:
    email = f"{how}@example.com"
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email=email)
    if how == "bulk_create":
        User.objects.bulk_create([UserFactory.build(email=email)])
    elif how == "create":
        UserFactory(email=email)
    else:
        User.objects.get_or_create(email=email, defaults={"username": how})
    assert User.objects.get_cached(email=email).email == email


def test_bulk_create_with_update_conflicts_drops_the_model() -> None:
    flow = FlowFactory(current_step=1)
    Flow.objects.get_cached(tenant_id=flow.tenant_id, session_id=flow.session_id)
    clone = FlowFactory.build(tenant_id=flow.tenant_id, session_id=flow.session_id, current_step=7)
    Flow.objects.bulk_create(
        [clone],
        update_conflicts=True,
        unique_fields=["tenant_id", "session_id"],
        update_fields=["current_step"],
    )
    got = Flow.objects.get_cached(tenant_id=flow.tenant_id, session_id=flow.session_id)
    assert got.current_step == 7


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_changing_a_unique_field_drops_the_old_value(tier: str) -> None:
    user = UserFactory(email="before@example.com")
    warm(user)
    user.email = "after@example.com"
    user.save()
    if tier == "l2":
        tiered_cache.clear_local()
    with pytest.raises(User.DoesNotExist):
        User.objects.get_cached(email="before@example.com")
    assert User.objects.get_cached(email="after@example.com").pk == user.pk


def test_unique_field_change_through_a_stale_instance_drops_the_old_value() -> None:
    """Another writer changed the email after we loaded the row: the value we never saw
    is dropped too, because entries are tied to the row's version, not to its old values."""
    user = UserFactory(email="first@example.com")
    stale = User.objects.get(pk=user.pk)
    User.objects.filter(pk=user.pk).update(email="second@example.com")
    assert User.objects.get_cached(email="second@example.com").pk == user.pk
    stale.email = "third@example.com"
    stale.save()
    for _ in range(2):
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(email="second@example.com")
        tiered_cache.clear_local()


def test_queryset_update_of_many_rows_flushes_the_model(settings: Any) -> None:
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "BULK_INVALIDATION_LIMIT": 2}
    users = UserFactory.create_batch(4, first_name="old")
    for u in users:
        warm(u)
    assert User.objects.filter(pk__in=[u.pk for u in users]).update(first_name="new") == 4
    assert l2_keys(User) == []
    for u in users:
        assert User.objects.get_cached(email=u.email).first_name == "new"


def test_raw_sql_through_djangos_connection_is_seen() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {User._meta.db_table} SET first_name = 'raw' WHERE id = %s", [user.pk]
        )
    assert User.objects.get_cached(pk=user.pk).first_name == "raw"
    assert User.objects.get_cached(email=user.email).first_name == "raw"


@pytest.mark.parametrize(
    "form",
    [
        "/* tag */ UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "-- a line\n-- and another\nUPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "/*+ 100%% a hint */ UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "/* nested /* comment */ here */ UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "SELECT 1; UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "EXPLAIN ANALYZE UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
        "EXPLAIN (ANALYSE, FORMAT JSON) UPDATE {t} SET first_name = 'raw' WHERE id = {pk}",
    ],
    ids=[
        "comment",
        "line-comments",
        "percent-in-comment",
        "nested",
        "after-select",
        "explain",
        "explain-options",
    ],
)
def test_raw_sql_that_does_not_start_with_its_write_is_seen(form: str) -> None:
    """A write behind a comment (a tag or a hint some libraries prepend), after another
    statement, or run by EXPLAIN ANALYZE is a write all the same."""
    user = UserFactory(first_name="old")
    warm(user)
    sql = form.format(t=User._meta.db_table, pk="%s")
    with connection.cursor() as cursor:
        if sql.startswith("SELECT 1;"):  # several statements: psycopg takes them without params
            cursor.execute(sql.replace("%s", str(int(user.pk))))
        else:
            cursor.execute(sql, [user.pk])
    assert User.objects.get_cached(pk=user.pk).first_name == "raw"
    assert User.objects.get_cached(email=user.email).first_name == "raw"


@pytest.mark.parametrize(
    "form",
    [
        "UPDATE {users} SET first_name = 'raw' FROM {tenants} WHERE {tenants}.id = %s",
        "UPDATE {users} AS u SET first_name = 'raw' FROM {tenants} t WHERE t.id = %s",
        "DELETE FROM {users} USING {tenants} WHERE {tenants}.id = %s",
    ],
    ids=["update-from", "update-from-aliased", "delete-using"],
)
def test_raw_sql_that_names_another_table_is_not_read_as_its_rows(form: str) -> None:
    """PostgreSQL's UPDATE ... FROM and DELETE ... USING choose the target's rows through
    another table: `other.id = %s` there names no row of the target (it was read as one)."""
    user = UserFactory(first_name="old")
    tenant = Tenant.objects.create(name="t-raw")
    while tenant.pk == user.pk:  # the misreading would drop the right row by chance
        tenant = Tenant.objects.create(name=f"t-raw-{tenant.pk}")
    warm(user)
    sql = form.format(users=User._meta.db_table, tenants=Tenant._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(sql, [tenant.pk])
    if form.startswith("DELETE"):
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(pk=user.pk)
    else:
        assert User.objects.get_cached(pk=user.pk).first_name == "raw"
        assert User.objects.get_cached(email=user.email).first_name == "raw"


@pytest.mark.parametrize(
    "form",
    [
        'UPDATE"{t}"SET first_name = \'raw\' WHERE"id"=%s AND last_name <> %s',
        "UPDATE {t} SET first_name = 'raw' WHERE last_name = %s\nOR FALSE AND id = %s",
        "UPDATE {t} SET first_name = 'raw' WHERE last_name = %s\tOR FALSE AND id = %s",
        "UPDATE {t} SET first_name = 'raw' WHERE last_name = %s OR(FALSE) AND id = %s",
        "UPDATE {t} SET first_name = 'raw' WHERE last_name = %s OR/**/FALSE AND id = %s",
        "UPDATE {t} SET first_name = 'raw' WHERE coalesce(last_name = %s AND id = %s AND TRUE,"
        " TRUE) = FALSE",
        "UPDATE {t} SET first_name = 'raw' WHERE CASE WHEN last_name = %s AND id = %s AND TRUE"
        " THEN FALSE ELSE TRUE END",
    ],
    ids=["unspaced", "or-on-a-line", "or-after-tab", "or-paren", "or-comment", "nested", "case"],
)
def test_raw_sql_is_read_whatever_its_spacing(form: str) -> None:
    """A write is read by its words, not by the spaces around them: a verb that touches a
    quoted name, an OR after a line break, a tab, a parenthesis or a comment, and an
    `id = %s` inside a function call or a CASE (it bounds no row there)."""
    a = UserFactory(first_name="old", last_name="a")
    b = UserFactory(first_name="old", last_name="b")
    warm(a)
    warm(b)
    sql = form.format(t=User._meta.db_table)
    params = [a.pk, "x"] if form.startswith('UPDATE"') else ["a", b.pk]
    if "coalesce" in form or "CASE" in form:
        params = ["b", b.pk]  # every user but b
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    for user in (a, b):
        expected = User._base_manager.get(pk=user.pk).first_name
        assert User.objects.get_cached(pk=user.pk).first_name == expected, user.last_name
        assert User.objects.get_cached(email=user.email).first_name == expected
    assert User._base_manager.get(pk=a.pk).first_name == "raw"  # the statement wrote a


# Forms a review found read wrongly: the target taken for another word, a keyword that
# touches its neighbour, an AND that closes a BETWEEN, bytes for text.
OTHER_FORMS = {
    "between": ("UPDATE {t} SET first_name = 'raw' WHERE id BETWEEN 0 AND id = %s", [True]),
    "placeholder-or": (
        "UPDATE {t} SET first_name = 'raw' WHERE id = %s AND last_name = %sOR TRUE",
        ["b", "zz"],
    ),
    "only-parenthesised": ("UPDATE ONLY ({t}) SET first_name = 'raw'", None),
    "only-comment": ("UPDATE ONLY/**/{t} SET first_name = 'raw'", None),
    "schema-comment": ("UPDATE public/**/.{t} SET first_name = 'raw'", None),
    "catalog": ("UPDATE {db}.public.{t} SET first_name = 'raw'", None),
    "bytes": ("UPDATE {t} SET first_name = 'raw'", None),
}


@pytest.mark.parametrize("form", list(OTHER_FORMS))
def test_raw_sql_whose_words_touch_or_hide_is_read(form: str) -> None:
    a = UserFactory(first_name="old", last_name="a")
    b = UserFactory(first_name="old", last_name="b")
    warm(a)
    warm(b)
    text, params = OTHER_FORMS[form]
    sql: str | bytes = text.format(t=User._meta.db_table, db=connection.settings_dict["NAME"])
    if params == ["b", "zz"]:
        params = [b.pk, "zz"]
    if form == "bytes":
        sql = str(sql).encode()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    for user in (a, b):
        expected = User._base_manager.get(pk=user.pk).first_name
        assert expected == "raw"
        assert User.objects.get_cached(pk=user.pk).first_name == expected, user.last_name


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_a_raw_upsert_on_lines_of_its_own_is_read(tier: str) -> None:
    """ON CONFLICT ... DO UPDATE at the start of a line, as triple-quoted SQL puts it."""
    tenant = Tenant.objects.create(name="old")
    Tenant.objects.get_cached(pk=tenant.pk)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
INSERT INTO {Tenant._meta.db_table} (id, name)
VALUES (%s, %s)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name
""",
            [tenant.pk, "upserted"],
        )
    if tier == "l2":
        tiered_cache.clear_local()
    assert Tenant.objects.get_cached(pk=tenant.pk).name == "upserted"


def test_an_unspaced_raw_update_in_a_rolled_back_block_reaches_no_tier() -> None:
    """A write the statement watcher missed would leave the block's reads free to fill the
    tiers with its uncommitted row (guarantee 3)."""
    user = UserFactory(first_name="old")
    with pytest.raises(RuntimeError), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                f'UPDATE"{User._meta.db_table}"SET first_name = %s WHERE"id"=%s',
                ["uncommitted", user.pk],
            )
        assert User.objects.get_cached(pk=user.pk).first_name == "uncommitted"
        raise RuntimeError
    tiered_cache.clear_local()
    assert User.objects.get_cached(pk=user.pk).first_name == "old"


def test_writes_outside_django_need_invalidate() -> None:
    user = UserFactory(first_name="old")
    warm(user)
    write_outside_django(
        f"UPDATE {User._meta.db_table} SET first_name = 'raw' WHERE id = %s", [user.pk]
    )
    assert User.objects.get_cached(pk=user.pk).first_name == "old"  # documented
    User.objects.invalidate(user.pk)
    assert User.objects.get_cached(pk=user.pk).first_name == "raw"
    assert User.objects.get_cached(email=user.email).first_name == "raw"


def test_flush_cache_drops_every_entry_of_the_model() -> None:
    users = UserFactory.create_batch(3)
    for u in users:
        warm(u)
    flow = FlowFactory()
    Flow.objects.get_cached(tenant_id=flow.tenant_id, session_id=flow.session_id)
    User.objects.flush_cache()
    assert l2_keys(User) == []
    assert len(l2_keys(Flow)) == 1
    misses = counters(User)["misses"]
    User.objects.get_cached(pk=users[0].pk)
    assert counters(User)["misses"] == misses + 1


def test_update_keeps_django_errors_and_return_values() -> None:
    users = UserFactory.create_batch(3)
    with pytest.raises(TypeError, match="slice"):
        User.objects.all()[:1].update(first_name="x")
    assert User.objects.filter(pk__in=[u.pk for u in users]).update(first_name="y") == 3
    assert User.objects.filter(pk=-1).update(first_name="z") == 0
    assert User.objects.bulk_update(users, ["first_name"]) == 3
