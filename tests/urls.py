"""URLs of the test suite: the admin (the test app's models and tiered_cache's dashboard),
Prometheus metrics, and the test app's async read endpoint."""

from django.contrib import admin
from django.urls import path

from tests.testapp.views import async_user_detail
from tiered_cache.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("async/users/<int:pk>/", async_user_detail, name="async-user-detail"),
]
