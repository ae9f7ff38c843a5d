"""URLs of the demo project: the admin, Prometheus metrics and the cached read endpoints."""

from django.contrib import admin
from django.urls import include, path

from tiered_cache.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("", include("demo_project.demo.urls")),
]
