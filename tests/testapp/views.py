"""A read endpoint of the test app, for the async API under ASGI (tests/test_async.py)."""

from django.http import HttpRequest, JsonResponse

from .models import User


async def async_user_detail(request: HttpRequest, pk: int) -> JsonResponse:
    """An L1 hit never leaves the event loop."""
    try:
        user = await User.objects.aget_cached(pk=pk)
    except User.DoesNotExist:
        return JsonResponse({"detail": f"No user {pk}."}, status=404)
    fields = ("id", "username", "email", "first_name")
    return JsonResponse({name: getattr(user, name) for name in fields})
