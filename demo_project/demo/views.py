"""JSON read endpoints; every row is fetched through tiered_cache. The load test's twins
(benchmarks/loadtest.py) are at the end: the same endpoints through the plain ORM and as
async views, and a write in each flavour."""

from typing import Any

from asgiref.sync import sync_to_async
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .models import FlowInstance, GlobalModel, Model, User
from .resolvers import resolve_global_model

_PRIVATE_FIELDS = {"password"}


def _as_dict(instance: models.Model) -> dict[str, Any]:
    return {
        field.attname: getattr(instance, field.attname)
        for field in instance._meta.concrete_fields
        if field.name not in _PRIVATE_FIELDS
    }


def _not_found(model: type[models.Model], lookup: dict[str, Any]) -> JsonResponse:
    return JsonResponse(
        {"detail": f"No {model._meta.verbose_name} matches {lookup}."},
        status=404,
        encoder=DjangoJSONEncoder,
    )


def _cached_response(model: type[models.Model], **lookup: Any) -> JsonResponse:
    try:
        instance = model.objects.get_cached(**lookup)
    except model.DoesNotExist:
        return _not_found(model, lookup)
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


# -- the cache tour: an HTML page of cached reads, for the debug toolbar -------------------
# With DJANGO_DEBUG on, the demo runs django-debug-toolbar with tiered_cache's panel
# (settings.py): these pages are HTML, so the toolbar shows on them, and its TieredCache
# panel lists each read below with the tier that served it. Reload: misses become L1 hits.


def _tour_rows() -> tuple[list[int], User | None, GlobalModel | None, FlowInstance | None]:
    # Plain ORM queries: they only pick the rows the tour reads through the cache.
    pks = list(User.objects.order_by("pk").values_list("pk", flat=True)[:5])
    return (
        pks,
        User.objects.order_by("pk").first(),
        GlobalModel.objects.order_by("pk").first(),
        FlowInstance.objects.order_by("pk").first(),
    )


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return f"{len(value)} rows"
    return "not found" if value is None else str(value)


def cache_tour(request: HttpRequest) -> HttpResponse:
    pks, user, global_model, flow = _tour_rows()
    reads: list[tuple[str, str]] = []
    if user is not None and request.GET.get("touch"):
        # A write first (?touch=1): the panel lists its invalidation, the reads miss the row.
        user.last_login_at = timezone.now()
        user.save(update_fields=["last_login_at"])
        reads.append((f"user.save() of user {user.pk}", "saved"))
    if user is not None:
        found = User.objects.get_cached(pk=user.pk)
        reads.append((f"User.objects.get_cached(pk={user.pk})", _shown(found)))
        found = User.objects.get_cached(email=user.email)
        reads.append((f"User.objects.get_cached(email={user.email!r})", _shown(found)))
    try:
        User.objects.get_cached(email="nobody@example.com")
    except User.DoesNotExist:
        reads.append(("User.objects.get_cached(email='nobody@example.com')", "does not exist"))
    many = User.objects.get_many_cached(pks)
    reads.append((f"User.objects.get_many_cached({pks})", _shown(many)))
    if flow is not None:
        lookup = {"tenant_id": flow.tenant_id, "session_id": flow.session_id}
        flow = FlowInstance.objects.get_cached(**lookup)
        reads.append((f"FlowInstance.objects.get_cached(**{lookup})", _shown(flow)))
    if global_model is not None:
        resolved = resolve_global_model(global_model.name)
        reads.append((f"resolve_global_model({global_model.name!r})", _shown(resolved)))
    return render(request, "demo/tour.html", {"reads": reads, "flavour": "sync"})


async def async_cache_tour(request: HttpRequest) -> HttpResponse:
    """cache_tour as an async view: aget_cached, aget_many_cached, acall."""
    pks, user, global_model, _ = await sync_to_async(_tour_rows)()
    reads: list[tuple[str, str]] = []
    if user is not None:
        found = await User.objects.aget_cached(pk=user.pk)
        reads.append((f"await User.objects.aget_cached(pk={user.pk})", _shown(found)))
    try:
        await User.objects.aget_cached(email="nobody@example.com")
    except User.DoesNotExist:
        reads.append(
            ("await User.objects.aget_cached(email='nobody@example.com')", "does not exist")
        )
    many = await User.objects.aget_many_cached(pks)
    reads.append((f"await User.objects.aget_many_cached({pks})", _shown(many)))
    if global_model is not None:
        resolved = await resolve_global_model.acall(global_model.name)
        reads.append((f"await resolve_global_model.acall({global_model.name!r})", _shown(resolved)))
    return render(request, "demo/tour.html", {"reads": reads, "flavour": "async"})


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


# -- the load test's twins (benchmarks/loadtest.py) ---------------------------------------
# The read endpoints above again under plain/ (the ORM, no cache) and async/ (aget_cached),
# and a write in each flavour, so that a load test compares the cache with its absence on
# the same rows, URLs and response bodies. The writes are csrf_exempt: the load generator
# has no session, and they change nothing but a timestamp.


def _plain_response(model: type[models.Model], **lookup: Any) -> JsonResponse:
    try:
        instance = model._default_manager.get(**lookup)
    except model.DoesNotExist:
        return _not_found(model, lookup)
    return JsonResponse(_as_dict(instance), encoder=DjangoJSONEncoder)


async def _async_cached_response(model: type[models.Model], **lookup: Any) -> JsonResponse:
    try:
        instance = await model.objects.aget_cached(**lookup)
    except model.DoesNotExist:
        return _not_found(model, lookup)
    return JsonResponse(_as_dict(instance), encoder=DjangoJSONEncoder)


def _touched(user: User) -> JsonResponse:
    return JsonResponse(
        {"id": user.pk, "last_login_at": user.last_login_at}, encoder=DjangoJSONEncoder
    )


def plain_user_detail(request: HttpRequest, pk: int) -> JsonResponse:
    return _plain_response(User, pk=pk)


def plain_user_by_email(request: HttpRequest) -> JsonResponse:
    email = request.GET.get("email")
    if not email:
        return JsonResponse({"detail": "Pass ?email=..."}, status=400)
    return _plain_response(User, email=email)


def plain_flow_detail(request: HttpRequest, tenant_id: str, session_id: str) -> JsonResponse:
    return _plain_response(FlowInstance, tenant_id=tenant_id, session_id=session_id)


def plain_model_detail(
    request: HttpRequest, provider_id: int, global_model_id: int
) -> JsonResponse:
    return _plain_response(Model, provider=provider_id, global_model=global_model_id)


def plain_global_model_by_name(request: HttpRequest, name: str) -> JsonResponse:
    return _plain_response(GlobalModel, name=name)


@csrf_exempt
@require_POST
def touch_user(request: HttpRequest, pk: int) -> JsonResponse:
    """A write through the cache: the row read with get_cached, one field saved (the save
    drops the row from Redis and from every process's L1 at commit)."""
    try:
        user = User.objects.get_cached(pk=pk)
    except User.DoesNotExist:
        return _not_found(User, {"pk": pk})
    user.last_login_at = timezone.now()
    user.save(update_fields=["last_login_at"])
    return _touched(user)


@csrf_exempt
@require_POST
def plain_touch_user(request: HttpRequest, pk: int) -> JsonResponse:
    """touch_user through the plain ORM: the row read with get, the same field saved."""
    try:
        user = User._default_manager.get(pk=pk)
    except User.DoesNotExist:
        return _not_found(User, {"pk": pk})
    user.last_login_at = timezone.now()
    user.save(update_fields=["last_login_at"])
    return _touched(user)


async def async_user_by_email(request: HttpRequest) -> JsonResponse:
    email = request.GET.get("email")
    if not email:
        return JsonResponse({"detail": "Pass ?email=..."}, status=400)
    return await _async_cached_response(User, email=email)


async def async_flow_detail(request: HttpRequest, tenant_id: str, session_id: str) -> JsonResponse:
    return await _async_cached_response(FlowInstance, tenant_id=tenant_id, session_id=session_id)


async def async_model_detail(
    request: HttpRequest, provider_id: int, global_model_id: int
) -> JsonResponse:
    return await _async_cached_response(Model, provider=provider_id, global_model=global_model_id)


async def async_global_model_by_name(request: HttpRequest, name: str) -> JsonResponse:
    return await _async_cached_response(GlobalModel, name=name)


@csrf_exempt
@require_POST
async def async_touch_user(request: HttpRequest, pk: int) -> JsonResponse:
    """touch_user as an async view: aget_cached, then asave."""
    try:
        user = await User.objects.aget_cached(pk=pk)
    except User.DoesNotExist:
        return _not_found(User, {"pk": pk})
    user.last_login_at = timezone.now()
    await user.asave(update_fields=["last_login_at"])
    return _touched(user)


@csrf_exempt
def floor(request: HttpRequest, rest: str) -> JsonResponse:
    """The load test's floor: any request of its mix answered without reading anything,
    which is what Django and the server cost by themselves."""
    return JsonResponse({"path": rest})


@csrf_exempt
async def async_floor(request: HttpRequest, rest: str) -> JsonResponse:
    """floor as an async view, the floor under ASGI."""
    return JsonResponse({"path": rest})
