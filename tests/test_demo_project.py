"""The demo project: its pages, its data loader and its migrations."""

import io

import pytest
from django.core.management import call_command

from demo_project.demo.factories import (
    FlowInstanceFactory,
    GlobalModelFactory,
    ModelFactory,
    UserFactory,
)
from demo_project.demo.models import FlowInstance, GlobalModel, Model, Provider, User

pytestmark = pytest.mark.django_db


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

    admin = User.objects.get(username="admin")
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
