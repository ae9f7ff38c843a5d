"""Settings of the demo project; tests/settings.py builds on these."""

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

TIERED_CACHE: dict = {}

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
