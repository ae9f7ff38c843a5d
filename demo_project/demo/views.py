"""JSON read endpoints; every row is fetched through tiered_cache."""

from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from .models import FlowInstance, GlobalModel, Model, User
from .resolvers import resolve_global_model

_PRIVATE_FIELDS = {"password"}


def _as_dict(instance: models.Model) -> dict[str, Any]:
    return {
        field.attname: getattr(instance, field.attname)
        for field in instance._meta.concrete_fields
        if field.name not in _PRIVATE_FIELDS
    }


def _cached_response(model: type[models.Model], **lookup: Any) -> JsonResponse:
    try:
        instance = model.objects.get_cached(**lookup)
    except model.DoesNotExist:
        return JsonResponse(
            {"detail": f"No {model._meta.verbose_name} matches {lookup}."},
            status=404,
            encoder=DjangoJSONEncoder,
        )
    return JsonResponse(_as_dict(instance), encoder=DjangoJSONEncoder)


def index(request: HttpRequest) -> HttpResponse:
    # Plain ORM queries: this page only picks example rows for the links.
    user = User.objects.order_by("pk").first()
    flow = FlowInstance.objects.order_by("pk").first()
    provider_model = Model.objects.order_by("pk").first()
    global_model = GlobalModel.objects.order_by("pk").first()
    return render(
        request,
        "demo/index.html",
        {
            "example_user": user,
            "flow": flow,
            "provider_model": provider_model,
            "global_model": global_model,
        },
    )


def user_detail(request: HttpRequest, pk: int) -> JsonResponse:
    return _cached_response(User, pk=pk)


def user_by_email(request: HttpRequest) -> JsonResponse:
    email = request.GET.get("email")
    if not email:
        return JsonResponse({"detail": "Pass ?email=..."}, status=400)
    return _cached_response(User, email=email)


def flow_detail(request: HttpRequest, tenant_id: str, session_id: str) -> JsonResponse:
    return _cached_response(FlowInstance, tenant_id=tenant_id, session_id=session_id)


def model_detail(request: HttpRequest, provider_id: int, global_model_id: int) -> JsonResponse:
    return _cached_response(Model, provider=provider_id, global_model=global_model_id)


def global_model_by_name(request: HttpRequest, name: str) -> JsonResponse:
    return _cached_response(GlobalModel, name=name)


def resolve_model_name(request: HttpRequest, name: str) -> JsonResponse:
    """The global model a name resolves to (provider model names first), cached with
    tiered_cache.cached and dropped whenever a provider, model or global model changes."""
    global_model = resolve_global_model(name)
    if global_model is None:
        return JsonResponse({"detail": f"No global model is called {name!r}."}, status=404)
    return JsonResponse(_as_dict(global_model), encoder=DjangoJSONEncoder)


async def async_user_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """The async API under ASGI: an L1 hit never leaves the event loop."""
    try:
        user = await User.objects.aget_cached(pk=pk)
    except User.DoesNotExist:
        return JsonResponse({"detail": f"No user {pk}."}, status=404)
    return JsonResponse(_as_dict(user), encoder=DjangoJSONEncoder)
