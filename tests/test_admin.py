"""The admin: flush actions on cached models and the cache dashboard, through Django's
test client, with permissions and CSRF. These tests commit, so invalidations apply."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

import tiered_cache
from tests.cache_fixtures import l2_keys
from tests.ops_helpers import change_behind_the_cache, read, read_cached
from tests.testapp.admin import PlainFlowAdmin
from tests.testapp.factories import GlobalModelFactory, UserFactory
from tests.testapp.models import Flow, GlobalModel, PlainFlow, ProviderModel, User
from tiered_cache import maintenance
from tiered_cache.admin import CacheAdminMixin
from tiered_cache.breaker import breaker
from tiered_cache.conf import conf
from tiered_cache.models import PendingInvalidation
from tiered_cache.registry import cached_models
from tiered_cache.tiers import local_tier

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("live_bus", "no_past_runs"),
]

DASHBOARD = "/admin/tiered_cache/pendinginvalidation/dashboard/"
CACHED = (
    "testapp.User",
    "testapp.Provider",
    "testapp.GlobalModel",
    "testapp.ProviderModel",
    "testapp.Flow",
)


@pytest.fixture(scope="session")
def celery_config() -> dict[str, Any]:
    """Celery's own defaults here: a memory:// broker, never the Redis queue that the
    worker of the task and browser tests consumes (tests/celery_fixtures.py)."""
    return {}


@pytest.fixture(autouse=True)
def test_celery_app(celery_app: Any) -> Any:
    """Warmups queued here go to the test app (memory:// broker unless a test's
    ``celery`` mark says otherwise), never to a real broker."""
    celery_app.set_current()
    celery_app.set_default()
    return celery_app


@pytest.fixture
def superuser() -> User:
    return UserFactory(username="root", is_staff=True, is_superuser=True)


@pytest.fixture
def su_client(client: Client, superuser: User) -> Client:
    client.force_login(superuser)
    return client


def staff(*perms: str) -> User:
    user = UserFactory(is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return User.objects.get(pk=user.pk)  # no stale permission cache


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def row_html(page: str, label: str) -> str:
    dom_id = "tc-" + label.lower().replace(".", "-")
    match = re.search(rf'<tr id="{dom_id}".*?</tr>', page, re.S)
    assert match, f"no dashboard row for {label}"
    return match.group(0)


def cell(row: str, css: str) -> str:
    match = re.search(rf'<td class="{css}">(.*?)</td>', row, re.S)
    assert match, css
    return match.group(1).strip()


# -- the index and who may see the dashboard -----------------------------------------


def test_admin_index_links_to_the_dashboard(su_client: Client) -> None:
    page = su_client.get("/admin/").content.decode()
    assert reverse("admin:tiered_cache_dashboard") == DASHBOARD
    assert f'<a href="{DASHBOARD}">Cache dashboard</a>' in page
    # The rest of the index is still there.
    assert 'href="/admin/testapp/user/"' in page


@pytest.mark.parametrize("who", ["anonymous", "not staff"])
def test_dashboard_is_for_staff_only(client: Client, who: str) -> None:
    if who == "not staff":
        client.force_login(UserFactory(is_staff=False))
    response = client.get(DASHBOARD)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert client.post(DASHBOARD, {"action": "flush_all"}).status_code == 302


def test_dashboard_shows_a_model_only_with_its_view_permission(client: Client) -> None:
    client.force_login(staff())
    page = client.get(DASHBOARD).content.decode()
    assert 'data-label="testapp.User"' not in page and "testapp.GlobalModel" not in page
    client.force_login(staff("testapp.view_user"))
    page = client.get(DASHBOARD).content.decode()
    assert 'data-label="testapp.User"' in page and "testapp.GlobalModel" not in page


def test_staff_without_change_permission_sees_no_buttons_and_may_not_post(
    client: Client,
) -> None:
    client.force_login(staff("testapp.view_user"))
    page = client.get(DASHBOARD).content.decode()
    assert "testapp.User" in page
    assert "Flush everything" not in page and ">Flush</button>" not in page
    for data in (
        {"action": "flush", "model": "testapp.User"},
        {"action": "flush_all"},
        {"action": "warmup", "model": "testapp.User"},
        {"action": "cleanup"},
    ):
        assert client.post(DASHBOARD, data).status_code == 403, data


def test_change_permission_on_one_model_gives_its_buttons_only(client: Client) -> None:
    user = UserFactory(first_name="old")
    read(User.objects, pk=user.pk)
    change_behind_the_cache(user, "new")
    client.force_login(staff("testapp.change_user"))

    page = client.get(DASHBOARD).content.decode()
    assert 'aria-label="Flush testapp.User"' in page
    assert 'aria-label="Flush testapp.GlobalModel"' not in page
    assert "Flush everything" not in page
    assert (
        client.post(DASHBOARD, {"action": "flush", "model": "testapp.GlobalModel"}).status_code
        == 403
    )
    response = client.post(DASHBOARD, {"action": "flush", "model": "testapp.User"}, follow=True)
    assert messages_of(response) == ["Flushed every testapp.User entry (all processes)."]
    assert User.objects.get_cached(pk=user.pk).first_name == "new"


# -- what the dashboard shows ---------------------------------------------------------


def test_dashboard_shows_every_cached_model(su_client: Client) -> None:
    users = UserFactory.create_batch(2)
    for _ in range(3):
        read(User.objects, pk=users[0].pk)  # a miss, then L1 hits
    tiered_cache.clear_local()
    read(User.objects, pk=users[0].pk)  # an L2 hit
    read(User.objects, email=users[1].email)  # a miss

    page = su_client.get(DASHBOARD).content.decode()

    for label in CACHED:
        assert f'data-label="{label}"' in page, label
    assert 'data-label="testapp.PlainFlow"' not in page
    row = row_html(page, "testapp.User")
    assert cell(row, "tc-lookups") == "<code>pk</code>, <code>email</code>"
    assert cell(row, "tc-l1") == str(local_tier.count("default:testapp.user")) == "2"
    assert cell(row, "tc-l2") == "2"  # users[0] by pk, users[1] by email
    # The chart: one SVG rect per tier that served reads, widths adding up to 100%.
    svg = re.search(r"<svg class=\"tc-chart\".*?</svg>", row, re.S)
    assert svg
    rects = re.findall(
        r'<rect x="([\d.]+)" y="0" width="([\d.]+)" height="10" '
        r'fill="#\w+" data-tier="(\w+)"><title>(.*?)</title>',
        svg.group(0),
    )
    tiers = {t: title for _, _, t, title in rects}
    assert set(tiers) == {"L1", "L2", "database"}
    assert tiers["L1"].startswith("L1: ") and tiers["database"].startswith("database: ")
    assert abs(sum(float(w) for _, w, _, _ in rects) - 100) < 0.01
    assert "all processes" in row
    assert re.search(r'<td class="tc-ratio">\d+\.\d%</td>', row)
    assert cell(row, "tc-last-warmup") == "never"
    # A model nobody read: an empty chart.
    assert 'data-tier="none"' in row_html(page, "testapp.Flow")
    assert '<strong id="tc-breaker">closed</strong>' in page
    assert '<strong id="tc-bus">live</strong>' in page
    assert 'id="tc-last-cleanup">never<' in page
    # Nothing is loaded from elsewhere (no CDN): every src and stylesheet is the site's own.
    # (Not `"cdn" not in page`: a random CSRF token may hold those three letters.)
    assert not re.search(r'\bsrc="(?:[a-z]+:)?//', page, re.IGNORECASE)
    assert not re.search(r'<link[^>]+href="(?:[a-z]+:)?//', page, re.IGNORECASE)


def test_dashboard_of_a_process_that_read_nothing_for_a_while_shows_its_bus_live(
    su_client: Client,
) -> None:
    # Trust lapses BUS_TRUST_WINDOW after the last read; the page asks for a heartbeat
    # itself rather than call a working bus late (a slow page load used to show that).
    read(User.objects, pk=UserFactory().pk)
    time.sleep(conf.BUS_TRUST_WINDOW + conf.BUS_HEARTBEAT)
    page = su_client.get(DASHBOARD).content.decode()
    assert '<strong id="tc-bus">live</strong>' in page


@pytest.mark.celery(broker_url=None)
def test_dashboard_without_redis_still_renders(su_client: Client, redis_unreachable: str) -> None:
    # Redis really gone (a closed port), not only the breaker open: an invalidation is sent
    # past an open breaker, and the outbox is drained as soon as Redis answers the bus.
    for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
        breaker.failure()

    response = su_client.get(DASHBOARD)

    page = response.content.decode()
    assert response.status_code == 200
    assert "Redis is unavailable (circuit open)" in page
    assert '<strong id="tc-breaker">open</strong>' in page
    assert cell(row_html(page, "testapp.User"), "tc-l2") == "?"
    assert "this process" in row_html(page, "testapp.User")
    response = su_client.post(DASHBOARD, {"action": "warmup", "model": "testapp.User"}, follow=True)
    assert messages_of(response) == ["Redis is unavailable (circuit open); nothing was done."]
    # A flush is never lost: it waits in the outbox until Redis answers.
    response = su_client.post(DASHBOARD, {"action": "flush", "model": "testapp.User"}, follow=True)
    assert messages_of(response) == ["Flushed every testapp.User entry (all processes)."]
    assert PendingInvalidation.objects.filter(
        model_label="default:testapp.user", flush=True
    ).exists()
    assert "1 pending invalidation<" in response.content.decode()


# -- the dashboard's buttons ------------------------------------------------------------


def test_flush_button_drops_one_model(su_client: Client) -> None:
    user = UserFactory(first_name="old")
    gm = GlobalModelFactory()
    read(User.objects, pk=user.pk)
    read(GlobalModel.objects, name=gm.name)
    change_behind_the_cache(user, "new")

    response = su_client.post(DASHBOARD, {"action": "flush", "model": "testapp.User"}, follow=True)

    assert response.redirect_chain == [(DASHBOARD, 302)]
    assert messages_of(response) == ["Flushed every testapp.User entry (all processes)."]
    page = response.content.decode()
    assert cell(row_html(page, "testapp.User"), "tc-l2") == "0"
    assert cell(row_html(page, "testapp.GlobalModel"), "tc-l2") == "1"
    assert User.objects.get_cached(pk=user.pk).first_name == "new"


def test_flush_everything(su_client: Client) -> None:
    read(User.objects, pk=UserFactory().pk)
    read(GlobalModel.objects, name=GlobalModelFactory().name)

    response = su_client.post(DASHBOARD, {"action": "flush_all"}, follow=True)

    assert messages_of(response) == [
        "Flushed every cached model: " + ", ".join(m._meta.label for m in cached_models()) + "."
    ]
    for model in (User, GlobalModel, ProviderModel, Flow):
        assert l2_keys(model) == []


@pytest.mark.celery(broker_url=None)
def test_warmup_button_runs_inline_without_a_broker(su_client: Client) -> None:
    UserFactory.create_batch(3)
    n = User.objects.count()  # and the superuser

    response = su_client.post(DASHBOARD, {"action": "warmup", "model": "testapp.User"}, follow=True)

    assert messages_of(response) == [
        "Warmup of testapp.User ran here, in this web process (no Celery broker is "
        f"configured): stored {n}, refused 0."
    ]
    row = row_html(response.content.decode(), "testapp.User")
    assert cell(row, "tc-l2") == str(n)
    assert f"stored {n}, refused 0" in cell(row, "tc-last-warmup")


def test_warmup_button_queues_on_celery_when_a_broker_is_configured(su_client: Client) -> None:
    # The test app's memory:// broker; no worker here (test_tasks and the browser have one).
    response = su_client.post(DASHBOARD, {"action": "warmup", "model": "testapp.User"}, follow=True)

    (message,) = messages_of(response)
    assert re.fullmatch(
        r"Warmup of testapp\.User queued on Celery \(task [0-9a-f-]{36}\); "
        r"a worker runs it\.",
        message,
    ), message


def test_cleanup_button(su_client: Client) -> None:
    response = su_client.post(DASHBOARD, {"action": "cleanup"}, follow=True)

    (message,) = messages_of(response)
    assert message.startswith("Cleanup scanned ")
    assert 'id="tc-last-cleanup">never<' not in response.content.decode()
    assert maintenance.last_runs()["cleanup"] is not None


def test_unknown_model_or_action_is_reported(su_client: Client) -> None:
    response = su_client.post(DASHBOARD, {"action": "flush", "model": "testapp.Nope"}, follow=True)
    assert messages_of(response) == ["'testapp.Nope': no such model is installed"]
    response = su_client.post(DASHBOARD, {"action": "drop_tables"}, follow=True)
    assert messages_of(response) == ["Unknown action 'drop_tables'."]


def test_dashboard_posts_need_a_csrf_token(superuser: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(superuser)
    page = client.get(DASHBOARD).content.decode()

    assert client.post(DASHBOARD, {"action": "flush_all"}).status_code == 403

    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token
    response = client.post(
        DASHBOARD, {"action": "flush_all", "csrfmiddlewaretoken": token.group(1)}
    )
    assert response.status_code == 302


# -- flush actions on the changelists ---------------------------------------------------


def action_names(client: Client, url: str) -> list[str]:
    form = client.get(url).context["action_form"]  # None when no action is allowed
    return [name for name, _ in form.fields["action"].choices] if form else []


def test_actions_are_offered_with_change_permission_only(client: Client) -> None:
    client.force_login(staff("testapp.view_user"))
    assert "flush_selected_from_cache" not in action_names(client, "/admin/testapp/user/")

    client.force_login(staff("testapp.view_user", "testapp.change_user"))
    choices = dict(
        client.get("/admin/testapp/user/").context["action_form"].fields["action"].choices
    )
    assert choices["flush_selected_from_cache"] == "Flush selected users from cache"
    assert choices["flush_all_from_cache"] == "Flush all user cache entries"

    # Forged without permission: not run.
    client.force_login(staff("testapp.view_user"))
    user = UserFactory(first_name="old")
    read(User.objects, pk=user.pk)
    change_behind_the_cache(user, "new")
    response = client.post(
        "/admin/testapp/user/",
        {
            "action": "flush_all_from_cache",
            "_selected_action": [user.pk],
            "index": 0,
        },
        follow=True,
    )
    assert not [m for m in messages_of(response) if m.startswith("Flushed")]
    assert read_cached(User.objects, pk=user.pk).first_name == "old"


def test_every_cached_model_admin_has_the_actions(su_client: Client) -> None:
    for url in (
        "/admin/testapp/user/",
        "/admin/testapp/provider/",
        "/admin/testapp/globalmodel/",
        "/admin/testapp/providermodel/",
        "/admin/testapp/flow/",
    ):
        names = action_names(su_client, url)
        assert {"flush_selected_from_cache", "flush_all_from_cache"} <= set(names), url
    assert "flush_all_from_cache" not in action_names(su_client, "/admin/testapp/plainflow/")


def test_flush_selected_drops_those_rows_in_every_lookup(su_client: Client) -> None:
    a = UserFactory(username="alice", first_name="old")
    b = UserFactory(username="bob", first_name="old")
    for u in (a, b):
        read(User.objects, pk=u.pk)
        read(User.objects, email=u.email)
    change_behind_the_cache(a, "new")
    change_behind_the_cache(b, "new")

    response = su_client.post(
        "/admin/testapp/user/",
        {
            "action": "flush_selected_from_cache",
            "_selected_action": [a.pk],
            "index": 0,
        },
        follow=True,
    )

    assert messages_of(response) == ["Flushed 1 user from the cache in every process: alice."]
    assert User.objects.get_cached(pk=a.pk).first_name == "new"
    assert User.objects.get_cached(email=a.email).first_name == "new"
    assert read_cached(User.objects, pk=b.pk).first_name == "old"  # not selected


def test_flush_selected_names_a_few_and_counts_the_rest(su_client: Client) -> None:
    users = UserFactory.create_batch(7)
    response = su_client.post(
        "/admin/testapp/user/",
        {
            "action": "flush_selected_from_cache",
            "_selected_action": [u.pk for u in users],
            "index": 0,
        },
        follow=True,
    )
    (message,) = messages_of(response)
    assert message.startswith("Flushed 7 users from the cache in every process: ")
    assert message.endswith(" and 2 more.")


def test_flush_all_action(su_client: Client) -> None:
    users = [UserFactory(first_name="old") for _ in range(2)]
    for u in users:
        read(User.objects, pk=u.pk)
        change_behind_the_cache(u, "new")

    response = su_client.post(
        "/admin/testapp/user/",
        {
            "action": "flush_all_from_cache",
            "_selected_action": [users[0].pk],
            "index": 0,
        },
        follow=True,
    )

    assert messages_of(response) == [
        "Flushed all user cache entries (testapp.User, every lookup, every process)."
    ]
    assert [User.objects.get_cached(pk=u.pk).first_name for u in users] == ["new", "new"]


# -- the outbox admin and the mixin's check -------------------------------------------------


def test_outbox_is_read_only_and_links_to_the_dashboard(su_client: Client) -> None:
    PendingInvalidation.objects.create(
        model_label="default:testapp.user", rows=["2.i1"], flush=False
    )
    page = su_client.get("/admin/tiered_cache/pendinginvalidation/").content.decode()
    assert f'<a href="{DASHBOARD}">Cache dashboard</a>' in page
    assert "testapp.user" in page
    assert "/admin/tiered_cache/pendinginvalidation/add/" not in page


def test_mixin_on_an_uncached_model_fails_the_check() -> None:
    class Broken(CacheAdminMixin, PlainFlowAdmin):
        pass

    errors = Broken(PlainFlow, admin.site).check()
    assert [e.id for e in errors] == ["tiered_cache.E100"]
    assert "testapp.PlainFlow has no cached manager" in errors[0].msg

    # With the checks skipped, "Flush all" says so instead of a 500.
    from django.contrib.messages.storage.cookie import CookieStorage
    from django.test import RequestFactory

    request = RequestFactory().post("/admin/testapp/plainflow/")
    request._messages = CookieStorage(request)  # type: ignore[attr-defined]
    Broken(PlainFlow, admin.site).flush_all_from_cache(request, PlainFlow.objects.none())
    assert [str(m) for m in request._messages] == [  # type: ignore[attr-defined]
        "testapp.PlainFlow is not cached (it has no CachedManager)"
    ]


def test_mixin_after_model_admin_is_refused_at_class_creation() -> None:
    from django.core.exceptions import ImproperlyConfigured

    # After ModelAdmin, the mixin's check() would never run: a flush would fail instead.
    with pytest.raises(ImproperlyConfigured, match=r"Late: put CacheAdminMixin before ModelAdmin"):

        class Late(admin.ModelAdmin, CacheAdminMixin):
            pass

    # The example keeps the admin's own base (a third party's, say).
    with pytest.raises(
        ImproperlyConfigured, match=r"class AfterASubclass\(CacheAdminMixin, PlainFlowAdmin\)"
    ):

        class AfterASubclass(PlainFlowAdmin, CacheAdminMixin):
            pass


def test_mixin_keeps_an_admins_own_actions() -> None:
    class WithOwn(CacheAdminMixin, admin.ModelAdmin):
        actions = ["make_inactive"]

    class Subclass(WithOwn):
        pass

    class Off(CacheAdminMixin, admin.ModelAdmin):
        actions = None

    assert WithOwn.actions == ["make_inactive", "flush_selected_from_cache", "flush_all_from_cache"]
    assert Subclass.actions == WithOwn.actions
    assert Off.actions is None
