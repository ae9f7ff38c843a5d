"""The demo project: its pages, its data loader and its migrations."""

import io

import pytest
from celery import beat
from celery.schedules import schedule as every
from django.contrib.auth import get_user_model
from django.core.management import call_command

from demo_project.demo.factories import (
    FlowInstanceFactory,
    GlobalModelFactory,
    ModelFactory,
    ProviderFactory,
    UserFactory,
)
from demo_project.demo.models import FlowInstance, GlobalModel, Model, Provider, User
from demo_project.demo.resolvers import resolve_global_model
from tests.cache_fixtures import l2_keys
from tiered_cache import registry

# The demo's pages under the demo's URLconf (the suite's own is tests/urls.py).
pytestmark = [pytest.mark.django_db, pytest.mark.urls("demo_project.urls")]


def test_index_links_every_endpoint(client):
    user = UserFactory()
    flow = FlowInstanceFactory()

    response = client.get("/")

    assert response.status_code == 200
    page = response.content.decode()
    for endpoint in ("/users/", "/users/by-email/", "/flows/", "/models/", "/global-models/"):
        assert endpoint in page
    assert f"/users/{user.pk}/" in page
    assert f"/flows/{flow.tenant_id}/{flow.session_id}/" in page


def test_index_without_data(client):
    assert client.get("/").status_code == 200


def test_user_by_pk(client):
    user = UserFactory()

    response = client.get(f"/users/{user.pk}/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == user.pk
    assert body["email"] == user.email
    assert "password" not in body
    assert client.get(f"/users/{user.pk + 10_000}/").status_code == 404


def test_user_by_email(client):
    user = UserFactory()

    response = client.get("/users/by-email/", {"email": user.email})

    assert response.status_code == 200
    assert response.json()["id"] == user.pk
    assert client.get("/users/by-email/", {"email": "nobody@example.com"}).status_code == 404
    assert client.get("/users/by-email/").status_code == 400


def test_flow_by_tenant_and_session(client):
    flow = FlowInstanceFactory(tenant_id="tenant-a", session_id="s-1")
    FlowInstanceFactory(tenant_id="tenant-b", session_id="s-1")

    response = client.get("/flows/tenant-a/s-1/")

    assert response.status_code == 200
    assert response.json()["id"] == flow.pk
    assert client.get("/flows/tenant-a/s-2/").status_code == 404


def test_provider_model_by_pair(client):
    offer = ModelFactory()
    other = GlobalModelFactory()

    response = client.get(f"/models/{offer.provider_id}/{offer.global_model_id}/")

    assert response.status_code == 200
    assert response.json()["provider_model_name"] == offer.provider_model_name
    assert client.get(f"/models/{offer.provider_id}/{other.pk}/").status_code == 404


def test_global_model_by_name(client):
    global_model = GlobalModelFactory(name="gpt-4.1")

    response = client.get("/global-models/by-name/gpt-4.1/")

    assert response.status_code == 200
    assert response.json()["id"] == global_model.pk
    assert client.get("/global-models/by-name/no-such-model/").status_code == 404


def test_load_demo_data_creates_the_data_once():
    out = io.StringIO()

    call_command("load_demo_data", stdout=out)

    counts = {
        "users": User.objects.count(),
        "providers": Provider.objects.count(),
        "global_models": GlobalModel.objects.count(),
        "models": Model.objects.count(),
        "flows": FlowInstance.objects.count(),
    }
    assert counts["users"] >= 1000
    assert counts["providers"] == 5
    assert counts["global_models"] == 20
    assert counts["models"] >= counts["global_models"] * 2
    assert counts["flows"] == 1000
    assert FlowInstance.objects.values("tenant_id").distinct().count() == 10
    assert User.objects.order_by("pk").first().check_password("password")

    call_command("load_demo_data", stdout=out)

    assert User.objects.count() == counts["users"]
    assert FlowInstance.objects.count() == counts["flows"]
    assert "nothing to do" in out.getvalue()


def test_ensure_demo_admin_is_idempotent():
    out = io.StringIO()

    call_command("ensure_demo_admin", stdout=out)
    call_command("ensure_demo_admin", stdout=out)

    # The command makes a user of AUTH_USER_MODEL: demo.User in the demo project, the test
    # app's user model under the test settings.
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser
    assert admin.check_password("admin")
    assert "password 'admin'" in out.getvalue()


def test_migrations_match_models():
    out = io.StringIO()
    try:
        call_command("makemigrations", check=True, dry_run=True, stdout=out, stderr=out)
    except SystemExit:
        pytest.fail(f"Models have changes that no migration records:\n{out.getvalue()}")


@pytest.mark.parametrize(
    "model_name", ["user", "provider", "globalmodel", "model", "flowinstance", "plainflowinstance"]
)
def test_admin_changelist_renders(admin_client, model_name):
    ModelFactory()
    FlowInstanceFactory()

    assert admin_client.get(f"/admin/demo/{model_name}/").status_code == 200
    assert admin_client.get(f"/admin/demo/{model_name}/", {"q": "a"}).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_resolve_global_model_follows_the_seed_order(caplog):
    active, inactive = ProviderFactory(), ProviderFactory(is_active=False)
    by_name = GlobalModelFactory(name="claude")
    mapped = GlobalModelFactory(name="claude-sonnet")
    ModelFactory(provider=inactive, global_model=by_name, provider_model_name="sonnet")
    ModelFactory(provider=active, global_model=mapped, provider_model_name="sonnet")
    assert resolve_global_model("sonnet").name == "claude-sonnet"
    assert resolve_global_model("  claude ").name == "claude"
    assert resolve_global_model("unknown") is None
    assert resolve_global_model("") is None
    other = GlobalModelFactory(name="claude-opus")
    ModelFactory(provider=ProviderFactory(), global_model=other, provider_model_name="sonnet")
    with caplog.at_level("WARNING"):
        assert resolve_global_model("sonnet").name == "claude-sonnet"
    assert "several global models" in caplog.text


# -- the beat schedule: warmups of the demo's models, a cleanup -------------------------


def demo_schedule():
    from demo_project.celery import app

    app.loader.import_default_modules()
    return beat.Scheduler(app=app, lazy=False).schedule


def test_beat_schedule_loads_and_names_existing_tasks():
    from demo_project.celery import app

    entries = {name: e for name, e in demo_schedule().items() if name.startswith("tiered-cache")}

    assert set(entries) == {
        "tiered-cache-warm-users",
        "tiered-cache-warm-models",
        "tiered-cache-warm-global-models",
        "tiered-cache-cleanup",
    }
    for name, entry in entries.items():
        assert entry.task in app.tasks, f"{name} names {entry.task}, which is not registered"
        assert isinstance(entry.schedule, every)
        period = entry.schedule.run_every.total_seconds()
        # A run waiting in the queue expires before the next one is due.
        assert 0 < entry.options["expires"] < period, name
        if entry.task == "tiered_cache.tasks.warmup":
            assert period <= 10 * 60
            (label,) = entry.args
            registry.resolve_models([label])  # a cached model
        else:
            assert entry.task == "tiered_cache.tasks.cleanup_expired"
            assert period == 3600


@pytest.mark.django_db(transaction=True)  # committed, so the worker's thread sees the rows
@pytest.mark.usefixtures("live_bus", "worker")
def test_beat_entries_run_on_the_worker(celery_app):
    UserFactory.create_batch(2)
    GlobalModelFactory()
    for name, entry in demo_schedule().items():
        if not name.startswith("tiered-cache"):
            continue
        res = celery_app.send_task(
            entry.task, args=entry.args, kwargs=entry.kwargs, **entry.options
        )
        out = res.get(timeout=30)
        assert "skipped" not in out, (name, out)
    assert len(l2_keys(User)) == 2


# -- the load test's twins (benchmarks/loadtest.py) ---------------------------------------


def test_plain_and_async_twins_answer_as_the_cached_endpoints(client):
    """plain/ (the ORM) and async/ (aget_cached) give the cached endpoints' bodies."""
    user = UserFactory()
    flow = FlowInstanceFactory()
    offer = ModelFactory()
    paths = [
        f"users/{user.pk}/",
        f"users/by-email/?email={user.email}",
        f"flows/{flow.tenant_id}/{flow.session_id}/",
        f"models/{offer.provider_id}/{offer.global_model_id}/",
        f"global-models/by-name/{offer.global_model.name}/",
    ]
    for path in paths:
        cached = client.get(f"/{path}")
        assert cached.status_code == 200, path
        for prefix in ("plain/", "async/"):
            twin = client.get(f"/{prefix}{path}")
            assert twin.status_code == 200, prefix + path
            assert twin.json() == cached.json(), prefix + path
    assert client.get(f"/plain/users/{user.pk + 10_000}/").status_code == 404
    assert client.get(f"/async/users/{user.pk + 10_000}/").status_code == 404


@pytest.mark.parametrize("prefix", ["", "plain/", "async/"])
def test_touch_saves_last_login_without_csrf(prefix):
    from django.test import Client

    user = UserFactory(last_login_at=None)
    csrf_client = Client(enforce_csrf_checks=True)

    assert csrf_client.get(f"/{prefix}users/{user.pk}/touch/").status_code == 405
    response = csrf_client.post(f"/{prefix}users/{user.pk}/touch/", {"by": "test"})

    assert response.status_code == 200
    user.refresh_from_db()
    assert user.last_login_at is not None
    assert response.json()["id"] == user.pk
    assert csrf_client.post(f"/{prefix}users/{user.pk + 10_000}/touch/").status_code == 404


@pytest.mark.parametrize("prefix", ["floor/", "async-floor/"])
def test_floor_answers_any_path_without_a_read(prefix, django_assert_num_queries):
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    with django_assert_num_queries(0):
        assert csrf_client.get(f"/{prefix}users/1/").json() == {"path": "users/1/"}
        assert csrf_client.post(f"/{prefix}users/1/touch/").status_code == 200
