from django.urls import path

from . import views

app_name = "demo"

urlpatterns = [
    path("", views.index, name="index"),
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
]
