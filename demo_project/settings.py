"""Settings of the demo project; tests/settings.py builds on these."""

import importlib.util
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = _env_bool("DJANGO_DEBUG", True)
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "django-insecure-demo-only-never-use-this-key-in-production"
)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "tiered_cache",
    "demo_project.demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# django-debug-toolbar with tiered_cache's panel (tiered_cache.panels.TieredCachePanel),
# while DEBUG is on and the toolbar is installed (the [debug-toolbar] extra; pinned in
# requirements/test.txt): every HTML page shows what each cached read was served from (try
# /tour/). The default panels are listed as debug_toolbar.settings.PANELS_DEFAULTS has them
# (importing it here would import django.test); tests/test_panels_browser.py checks that.
# tests/settings.py leaves the toolbar out of the suite.
DEBUG_TOOLBAR = DEBUG and importlib.util.find_spec("debug_toolbar") is not None
if DEBUG_TOOLBAR:
    INSTALLED_APPS.append("debug_toolbar")
    # First: no middleware here encodes the response (the toolbar's docs ask for that).
    MIDDLEWARE.insert(0, "debug_toolbar.middleware.DebugToolbarMiddleware")
    INTERNAL_IPS = ["127.0.0.1", "::1"]
    DEBUG_TOOLBAR_PANELS = [
        "debug_toolbar.panels.history.HistoryPanel",
        "debug_toolbar.panels.versions.VersionsPanel",
        "debug_toolbar.panels.timer.TimerPanel",
        "debug_toolbar.panels.settings.SettingsPanel",
        "debug_toolbar.panels.headers.HeadersPanel",
        "debug_toolbar.panels.request.RequestPanel",
        "debug_toolbar.panels.sql.SQLPanel",
        "debug_toolbar.panels.staticfiles.StaticFilesPanel",
        "debug_toolbar.panels.templates.TemplatesPanel",
        "debug_toolbar.panels.alerts.AlertsPanel",
        "debug_toolbar.panels.cache.CachePanel",
        "debug_toolbar.panels.signals.SignalsPanel",
        "debug_toolbar.panels.tasks.TasksPanel",
        "debug_toolbar.panels.community.CommunityPanel",
        "debug_toolbar.panels.redirects.RedirectsPanel",
        "debug_toolbar.panels.profiling.ProfilingPanel",
        "tiered_cache.panels.TieredCachePanel",
    ]

ROOT_URLCONF = "demo_project.urls"
WSGI_APPLICATION = "demo_project.wsgi.application"
ASGI_APPLICATION = "demo_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        env="DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
    ),
}
# DJANGO_DB_POOL=N: PostgreSQL connections from a pool of up to N per process (psycopg-pool,
# requirements/loadtest.txt) instead of one connection per request. The load test
# (benchmarks/loadtest.py) serves the demo so, as production would. Under ASGI each request's
# sync code runs on a thread of its own: persistent connections (CONN_MAX_AGE, per thread)
# would pile up there, a pool reuses them.
if int(os.environ.get("DJANGO_DB_POOL") or 0) > 0:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": int(os.environ["DJANGO_DB_POOL"]),
    }

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        # Short socket timeouts keep a slow or absent Redis from stalling requests.
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": 0.25,
            "SOCKET_TIMEOUT": 0.25,
        },
    },
}

# TIERED_CACHE_<NAME> in the environment sets these few: the load test
# (benchmarks/loadtest.py) runs the demo with and without the outage mode, and has its
# counters pushed every second.
TIERED_CACHE: dict = {
    name: float(os.environ[f"TIERED_CACHE_{name}"])
    for name in ("OUTAGE_STALE_SECONDS", "STATS_FLUSH_INTERVAL")
    if os.environ.get(f"TIERED_CACHE_{name}")
}

AUTH_USER_MODEL = "demo.User"
AUTH_PASSWORD_VALIDATORS: list = []

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = TIME_ZONE
# Periodic cache jobs. Plain seconds keep Celery out of the settings import; every run
# expires before the next one is due, and the tasks' own locks stop overlapping runs.
CELERY_BEAT_SCHEDULE: dict = {
    "tiered-cache-warm-users": {
        "task": "tiered_cache.tasks.warmup",
        "schedule": 5 * 60.0,
        "args": ("demo.User",),
        "kwargs": {"limit": 1000},
        "options": {"expires": 4 * 60},
    },
    "tiered-cache-warm-models": {
        "task": "tiered_cache.tasks.warmup",
        "schedule": 5 * 60.0,
        "args": ("demo.Model",),
        "kwargs": {"limit": 1000},
        "options": {"expires": 4 * 60},
    },
    "tiered-cache-warm-global-models": {
        "task": "tiered_cache.tasks.warmup",
        "schedule": 5 * 60.0,
        "args": ("demo.GlobalModel",),
        "kwargs": {"limit": 1000},
        "options": {"expires": 4 * 60},
    },
    "tiered-cache-cleanup": {
        "task": "tiered_cache.tasks.cleanup_expired",
        "schedule": 60 * 60.0,
        "options": {"expires": 30 * 60},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "{asctime} {levelname} {name}: {message}", "style": "{"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        "tiered_cache": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
