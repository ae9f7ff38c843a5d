"""URLs of the demo project: the admin, Prometheus metrics, the cached read endpoints, and the
debug toolbar's when it is on."""

from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from tiered_cache.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("", include("demo_project.demo.urls")),
]

# The debug toolbar's own views, where settings.py installed it (DEBUG on).
if "debug_toolbar" in settings.INSTALLED_APPS:
    from debug_toolbar.toolbar import debug_toolbar_urls

    urlpatterns += debug_toolbar_urls()
