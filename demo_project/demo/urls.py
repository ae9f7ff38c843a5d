from django.urls import path

from . import views

app_name = "demo"

urlpatterns = [
    path("", views.index, name="index"),
    # HTML pages of cached reads, for the debug toolbar's TieredCache panel (DJANGO_DEBUG).
    path("tour/", views.cache_tour, name="cache-tour"),
    path("async/tour/", views.async_cache_tour, name="async-cache-tour"),
    path("users/<int:pk>/", views.user_detail, name="user-detail"),
    path("users/by-email/", views.user_by_email, name="user-by-email"),
    path("flows/<str:tenant_id>/<str:session_id>/", views.flow_detail, name="flow-detail"),
    path(
        "models/<int:provider_id>/<int:global_model_id>/",
        views.model_detail,
        name="model-detail",
    ),
    path("resolve/<str:name>/", views.resolve_model_name, name="resolve-model-name"),
    path("async/users/<int:pk>/", views.async_user_detail, name="async-user-detail"),
    path(
        "global-models/by-name/<str:name>/",
        views.global_model_by_name,
        name="global-model-by-name",
    ),
    # The load test's twins (benchmarks/loadtest.py): a write through the cache, the same
    # endpoints through the plain ORM, and as async views.
    path("users/<int:pk>/touch/", views.touch_user, name="touch-user"),
    path("plain/users/<int:pk>/", views.plain_user_detail, name="plain-user-detail"),
    path("plain/users/by-email/", views.plain_user_by_email, name="plain-user-by-email"),
    path(
        "plain/flows/<str:tenant_id>/<str:session_id>/",
        views.plain_flow_detail,
        name="plain-flow-detail",
    ),
    path(
        "plain/models/<int:provider_id>/<int:global_model_id>/",
        views.plain_model_detail,
        name="plain-model-detail",
    ),
    path(
        "plain/global-models/by-name/<str:name>/",
        views.plain_global_model_by_name,
        name="plain-global-model-by-name",
    ),
    path("plain/users/<int:pk>/touch/", views.plain_touch_user, name="plain-touch-user"),
    path("async/users/by-email/", views.async_user_by_email, name="async-user-by-email"),
    path(
        "async/flows/<str:tenant_id>/<str:session_id>/",
        views.async_flow_detail,
        name="async-flow-detail",
    ),
    path(
        "async/models/<int:provider_id>/<int:global_model_id>/",
        views.async_model_detail,
        name="async-model-detail",
    ),
    path(
        "async/global-models/by-name/<str:name>/",
        views.async_global_model_by_name,
        name="async-global-model-by-name",
    ),
    path("async/users/<int:pk>/touch/", views.async_touch_user, name="async-touch-user"),
    # Any path of the load test's mix, answered without a read: what Django costs alone.
    path("floor/<path:rest>", views.floor, name="floor"),
    path("async-floor/<path:rest>", views.async_floor, name="async-floor"),
]
