"""`make dist`: build the sdist and the wheel into dist/, check them, install the wheel into
a fresh virtualenv outside the repository and run a small Django project on it.

1. `python -m build` (the wheel is built from the sdist, so a file missing from the sdist
   is missing from the wheel too), then `twine check --strict`.
2. Their files: the wheel holds every file of tiered_cache/ in the checkout (the Lua
   scripts, templates, migrations, py.typed, the management command) and nothing outside
   the package and its metadata; the sdist the same files, README.md, CHANGELOG.md and
   pyproject.toml, and no tests; both carry pyproject.toml's version.
3. A virtualenv in a temporary directory, `pip install` of the wheel (its dependencies from
   the package index pip is configured with, through pip's cache) and psycopg.
4. A project generated beside it, run from there: it imports tiered_cache from the
   virtualenv's site-packages, on a PostgreSQL database created for the run (dropped at
   the end) and Redis under a key prefix of its own (deleted at the end): `check`,
   `makemigrations --check` (the wheel's migrations match its models), `migrate`, cached
   reads through each tier, a write's invalidation, the admin (index, dashboard, outbox,
   the flush actions posted to the changelist as a logged-in superuser) and
   `manage.py tiered_cache stats|warmup|flush|cleanup`.

Any failure exits non-zero with what went wrong. Run from the repository root with the
development virtualenv (it has build, twine, psycopg and redis):

    .venv/bin/python tests/dist_smoke.py [--keep]

DATABASE_URL names the PostgreSQL server (its database is not touched);
DIST_REDIS_URL the Redis database (default redis://127.0.0.1:6379/12).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "tiered_cache"
DIST_NAME = "django-tiered-cache"
# Files the app loads at run time, besides its modules: each must be in the wheel.
MUST_SHIP = (
    "py.typed",
    "lua/*.lua",
    "templates/tiered_cache/admin/*.html",
    "migrations/0001_initial.py",
    "management/commands/tiered_cache.py",
)

# The sdist's other files (MANIFEST.in).
SDIST_TOP = {"pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"}


class SmokeError(Exception):
    pass


STARTED = time.monotonic()


def step(title: str) -> None:
    print(f"\n==> [{time.monotonic() - STARTED:4.1f}s] {title}", flush=True)


def run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    show: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its whole output. show: echo its output."""
    argv = [str(c) for c in cmd]
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise SmokeError(
            f"`{' '.join(argv)}` (in {cwd}) exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    if show:
        out = (proc.stdout + proc.stderr).strip()
        if out:
            print(textwrap.indent(out, "    "), flush=True)
    return proc


def pyproject_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


# -- 1, 2: build and check ------------------------------------------------------------


def build(dist: Path) -> tuple[Path, Path]:
    shutil.rmtree(dist, ignore_errors=True)
    run([sys.executable, "-m", "build", "--outdir", dist, ROOT])
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SmokeError(f"expected one wheel and one sdist in {dist}: {os.listdir(dist)}")
    for path in (*sdists, *wheels):
        print(f"    {path.relative_to(ROOT)}  {path.stat().st_size / 1024:.0f} KiB")
    run(
        [sys.executable, "-m", "twine", "--no-color", "check", "--strict", *sdists, *wheels],
        show=True,
    )
    return wheels[0], sdists[0]


def package_files() -> set[str]:
    """tiered_cache/'s files in the checkout, tracked or not (ignored ones left out)."""
    proc = run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", PACKAGE],
        check=False,
    )
    if proc.returncode == 0 and proc.stdout.strip():
        names = {line for line in proc.stdout.splitlines() if (ROOT / line).is_file()}
    else:  # not a git checkout
        names = {
            str(p.relative_to(ROOT))
            for p in (ROOT / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
    return names


def check_contents(wheel: Path, sdist: Path, version: str) -> None:
    problems: list[str] = []
    wanted = package_files()
    for pattern in MUST_SHIP:
        if not list((ROOT / PACKAGE).glob(pattern)):
            problems.append(f"the checkout has no {PACKAGE}/{pattern}")

    norm = DIST_NAME.replace("-", "_")
    if wheel.name != f"{norm}-{version}-py3-none-any.whl":
        problems.append(f"wheel name {wheel.name} (version {version}, pure Python expected)")
    if sdist.name != f"{norm}-{version}.tar.gz":
        problems.append(f"sdist name {sdist.name} (version {version} expected)")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"{norm}-{version}.dist-info/"
        meta = zf.read(info + "METADATA").decode() if info + "METADATA" in names else ""
    missing = sorted(wanted - names)
    if missing:
        problems.append(f"the wheel lacks files of the checkout: {missing}")
    stray = sorted(n for n in names if not n.startswith((f"{PACKAGE}/", info)))
    if stray:
        problems.append(f"the wheel holds files outside {PACKAGE}/: {stray}")
    compiled = sorted(n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo")))
    if compiled:
        problems.append(f"the wheel holds compiled files: {compiled}")
    extra = sorted(n for n in names if n.startswith(f"{PACKAGE}/") and n not in wanted)
    if extra:  # a stale build/ directory, or a file the checkout no longer has
        problems.append(f"the wheel holds files the checkout does not: {extra}")
    if f"\nVersion: {version}\n" not in meta:
        problems.append(f"the wheel's METADATA does not say Version: {version}")

    with tarfile.open(sdist) as tf:
        snames = {m.name for m in tf.getmembers() if m.isfile()}
    top = f"{norm}-{version}/"
    smissing = sorted(n for n in wanted | SDIST_TOP if top + n not in snames)
    if smissing:
        problems.append(f"the sdist lacks: {smissing}")
    sstray = sorted(
        n
        for n in snames
        if not n.startswith((f"{top}{PACKAGE}/", f"{top}{norm}.egg-info/"))
        and n.removeprefix(top) not in SDIST_TOP | {"PKG-INFO", "setup.cfg"}
    )
    if sstray:  # setuptools adds tests/test*.py on its own: MANIFEST.in prunes tests/
        problems.append(f"the sdist holds files outside {PACKAGE}/: {sstray}")

    if problems:
        raise SmokeError("the distributions are incomplete:\n  " + "\n  ".join(problems))
    lua = sum(n.endswith(".lua") for n in names)
    html = sum(n.endswith(".html") for n in names)
    migrations = sum(bool(re.match(rf"{PACKAGE}/migrations/\d{{4}}_\w+\.py$", n)) for n in names)
    print(
        f"    wheel: {len(names)} files, all {len(wanted)} of {PACKAGE}/ ({lua} Lua scripts, "
        f"{html} templates, {migrations} migrations, py.typed); sdist: {len(snames)} files"
    )


# -- 3: a clean virtualenv ------------------------------------------------------------


def clean_env(venv: Path) -> dict[str, str]:
    """The environment without anything that would point Python back at the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "DJANGO_", "TC_", "TEST_", "VIRTUAL_ENV", "PYTEST"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pinned(requirement: str) -> str:
    """requirements/base.txt's line for this package (the version the suite runs)."""
    for line in (ROOT / "requirements" / "base.txt").read_text().splitlines():
        if re.match(rf"{re.escape(requirement)}(\[|=)", line.strip()):
            return line.strip()
    return requirement


def make_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    # The base interpreter of this virtualenv, not this virtualenv's packages.
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel,
         pinned("psycopg")],
        cwd=tmp,
        env=clean_env(venv),
    )  # fmt: skip
    freeze = run([python, "-m", "pip", "freeze"], cwd=tmp, env=clean_env(venv)).stdout
    keep = ("django=", "django-redis=", "redis=", "hiredis=", "psycopg=", "django-tiered")
    versions = [line for line in freeze.splitlines() if line.lower().startswith(keep)]
    print(f"    {venv}: {', '.join(versions)}")
    return python


# -- 4: the smoke project -------------------------------------------------------------


def database_url() -> dict[str, Any]:
    url = urlsplit(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    return {
        "USER": unquote(url.username or "postgres"),
        "PASSWORD": unquote(url.password or ""),
        "HOST": url.hostname or "127.0.0.1",
        "PORT": str(url.port or 5432),
    }


@contextmanager
def fresh_database() -> Iterator[dict[str, Any]]:
    import psycopg  # the development virtualenv's
    from psycopg import sql

    server = database_url()
    name = f"tc_dist_smoke_{os.getpid()}_{secrets.token_hex(3)}"
    conninfo = {
        "host": server["HOST"],
        "port": server["PORT"],
        "user": server["USER"],
        "password": server["PASSWORD"] or None,
        "dbname": "postgres",
        "connect_timeout": 10,
    }
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield {"ENGINE": "django.db.backends.postgresql", "NAME": name, **server}
    finally:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def redis_prefix() -> Iterator[tuple[str, str]]:
    import redis  # the development virtualenv's

    url = os.environ.get("DIST_REDIS_URL", "redis://127.0.0.1:6379/12")
    prefix = f"tc-dist-{os.getpid()}-{secrets.token_hex(4)}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.ping()
    try:
        yield url, prefix
    finally:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        left = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        client.close()
        if left:
            raise SmokeError(f"Redis keys of the smoke run remain: {left[:5]}")


SETTINGS = """\
# Generated by tests/dist_smoke.py: a project on the installed wheel.
SECRET_KEY = "dist-smoke-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "tiered_cache",
    "smokeapp",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "smoke_project.urls"
TEMPLATES = [
    {{
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {{
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        }},
    }},
]
DATABASES = {{"default": {database!r}}}
CACHES = {{
    "default": {{
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": {redis_url!r},
        "KEY_PREFIX": {prefix!r},
    }},
}}
TIERED_CACHE = {{"KEY_PREFIX": {prefix!r}}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "smoke_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

URLS = """\
from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
"""

MODELS = """\
from django.db import models

from tiered_cache import CachedManager


class Widget(models.Model):
    name = models.CharField(max_length=50, unique=True)
    colour = models.CharField(max_length=20)

    objects = CachedManager(lookups=["name"])

    def __str__(self):
        return self.name
"""

ADMIN = """\
from django.contrib import admin

from tiered_cache.admin import CacheAdminMixin

from .models import Widget


@admin.register(Widget)
class WidgetAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("name", "colour")
"""

# Run in the smoke project with the clean virtualenv's Python, after migrate.
SMOKE = """\
import os
import sysconfig
from importlib import resources
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "smoke_project.settings")
django.setup()

import tiered_cache  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.db.migrations.recorder import MigrationRecorder  # noqa: E402
from django.test import Client  # noqa: E402
from smokeapp.models import Widget  # noqa: E402
from tiered_cache.bus import bus  # noqa: E402
from tiered_cache.reporting import publish_stats  # noqa: E402


def check(ok, what):
    if not ok:
        raise SystemExit(f"smoke: FAILED: {what}")
    print(f"ok: {what}", flush=True)


site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(tiered_cache.__file__).resolve()
check(where.is_relative_to(site), f"tiered_cache is imported from {where.parent}")
check(not where.is_relative_to(Path(os.environ["SMOKE_CHECKOUT"])), "not from the checkout")
check(
    tiered_cache.__version__ == os.environ["SMOKE_VERSION"],
    f"tiered_cache.__version__ is {tiered_cache.__version__}",
)
pkg = resources.files("tiered_cache")
check((pkg / "py.typed").is_file(), "py.typed is installed")
lua = sorted(p.name for p in (pkg / "lua").iterdir() if p.name.endswith(".lua"))
check(lua, f"{len(lua)} Lua scripts are installed")

on_disk = {
    p.name[:-3]
    for p in (pkg / "migrations").iterdir()
    if p.name[:4].isdigit() and p.name.endswith(".py")
}
applied = set(
    MigrationRecorder.Migration.objects.filter(app="tiered_cache").values_list("name", flat=True)
)
check(on_disk and on_disk == applied, f"migrate applied the wheel's migrations {sorted(on_disk)}")


TIERS = ("l1_hits", "l2_hits", "negative_hits", "misses", "bypassed")


def counts():
    return dict(tiered_cache.stats().get("smokeapp.widget", {}))


def read(tier, **lookup):
    \"\"\"get_cached with the bus live; the counter of the tier expected goes up by one.\"\"\"
    if not bus.wait_trusted(10):
        raise SystemExit(f"smoke: FAILED: the invalidation bus is not live: {bus.state()}")
    before = counts()
    try:
        obj = Widget.objects.get_cached(**lookup)
    except Widget.DoesNotExist:
        obj = None
    after = counts()
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in TIERS}
    expected = {**dict.fromkeys(TIERS, 0), tier: 1}
    check(moved == expected, f"get_cached({lookup}): one {tier} ({moved})")
    return obj


bolt = Widget.objects.create(name="bolt", colour="grey")
check(read("misses", pk=bolt.pk).colour == "grey", "a first read goes to the database")
check(read("l1_hits", pk=bolt.pk) == bolt, "the second is an L1 hit")
check(read("misses", name="bolt") == bolt, "a declared lookup reads the database once")
check(read("l1_hits", name="bolt") == bolt, "then L1")
tiered_cache.clear_local()
check(read("l2_hits", pk=bolt.pk) == bolt, "after clear_local() it comes from Redis")
check(read("misses", name="nut") is None, "a missing row raises DoesNotExist")
check(read("negative_hits", name="nut") is None, "and its absence is remembered")
bolt.colour = "blue"
bolt.save()
check(read("misses", pk=bolt.pk).colour == "blue", "a save invalidates: the new row is read")
Widget.objects.create(name="nut", colour="brass")
check(read("misses", name="nut").colour == "brass", "a create drops the remembered absence")

admin_user = User.objects.create_superuser("smoke", "smoke@example.com", "smoke-password")
client = Client()
check(client.login(username="smoke", password="smoke-password"), "the superuser logs in")

page = client.get("/admin/")
check(page.status_code == 200, "the admin index renders")
check(b'id="tiered-cache-dashboard-link"' in page.content, "it links the cache dashboard")
page = client.get("/admin/tiered_cache/pendinginvalidation/dashboard/")
check(page.status_code == 200 and b"smokeapp.widget" in page.content.lower(), "the dashboard")
page = client.get("/admin/tiered_cache/pendinginvalidation/")
check(page.status_code == 200, "the outbox's changelist renders")
changelist = "/admin/smokeapp/widget/"
page = client.get(changelist)
check(page.status_code == 200 and b"flush_selected_from_cache" in page.content,
      "the widget changelist offers the flush actions")

read("l1_hits", pk=bolt.pk)
page = client.post(
    changelist,
    {"action": "flush_selected_from_cache", "_selected_action": [bolt.pk], "index": 0},
    follow=True,
)
text = page.content.decode()
check(page.status_code == 200 and "Flushed 1 widget from the cache" in text,
      "the admin action 'Flush selected widgets from cache' reports the flush")
check(read("misses", pk=bolt.pk) == bolt, "after it the row is read from the database")
read("l1_hits", pk=bolt.pk)
page = client.post(
    changelist,
    {"action": "flush_all_from_cache", "_selected_action": [bolt.pk], "index": 0},
    follow=True,
)
check(page.status_code == 200 and "Flushed all widget cache entries" in page.content.decode(),
      "the admin action 'Flush all widget cache entries' reports the flush")
check(read("misses", pk=bolt.pk) == bolt, "after it the row is read from the database")
publish_stats()  # for `manage.py tiered_cache stats`, next
print("smoke: OK", flush=True)
"""


def write_project(project: Path, database: dict[str, Any], redis_url: str, prefix: str) -> None:
    files = {
        "manage.py": MANAGE,
        "smoke.py": SMOKE,
        "smoke_project/__init__.py": "",
        "smoke_project/settings.py": SETTINGS.format(
            database=database, redis_url=redis_url, prefix=prefix
        ),
        "smoke_project/urls.py": URLS,
        "smokeapp/__init__.py": "",
        "smokeapp/models.py": MODELS,
        "smokeapp/admin.py": ADMIN,
        "smokeapp/migrations/__init__.py": "",
    }
    for name, text in files.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def smoke(python: Path, tmp: Path, version: str) -> None:
    project = tmp / "project"
    env = clean_env(python.parent.parent)
    env["SMOKE_VERSION"] = version
    env["SMOKE_CHECKOUT"] = str(ROOT)

    def manage(*args: str, show: bool = True) -> str:
        print(f"  $ manage.py {' '.join(args)}", flush=True)
        return run([python, "-s", "manage.py", *args], cwd=project, env=env, show=show).stdout

    with fresh_database() as database, redis_prefix() as (redis_url, prefix):
        print(f"    database {database['NAME']}, Redis {redis_url} under prefix {prefix}")
        write_project(project, database, redis_url, prefix)
        manage("makemigrations", "smokeapp", "--noinput")
        manage("check", "--fail-level", "WARNING")
        manage("makemigrations", "--check", "--dry-run", "--noinput")
        manage("migrate", "--noinput", show=False)
        print("  $ python smoke.py", flush=True)
        run([python, "-s", "smoke.py"], cwd=project, env=env, show=True)

        stats = json.loads(manage("tiered_cache", "stats", "--json", show=False))
        row = stats["models"].get("smokeapp.Widget")
        if row is None or row["lookups"] != ["pk", "name"]:
            raise SmokeError(f"tiered_cache stats --json: no smokeapp.Widget as expected: {stats}")
        if row["misses"] < 1 or row["l1_hits"] < 1:
            raise SmokeError(f"tiered_cache stats --json: the smoke reads are not counted: {row}")
        print(f"    ok: stats --json counts the reads: {row['tiers']}")
        out = manage("tiered_cache", "warmup", "smokeapp.Widget")
        if not re.search(r"smokeapp\.widget: stored 2\b", out, re.I):
            raise SmokeError(f"tiered_cache warmup did not store the 2 widgets: {out}")
        out = manage("tiered_cache", "stats")
        if not re.search(r"^smokeapp\.widget\s+pk, name\s+\d+\s+[1-9]", out, re.M | re.I):
            raise SmokeError(f"tiered_cache stats shows no L2 entries after the warmup: {out}")
        manage("tiered_cache", "flush", "--all")
        manage("tiered_cache", "cleanup")
        bad = run(
            [python, "-s", "manage.py", "tiered_cache", "flush", "nosuch.Model"],
            cwd=project,
            env=env,
            check=False,
        )
        if bad.returncode == 0 or "nosuch" not in bad.stderr.lower():
            raise SmokeError(f"flush of an unknown model did not fail: {bad.stdout}{bad.stderr}")
        print("    ok: flush of an unknown model fails with a message")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output directory")
    args = parser.parse_args()
    version = pyproject_version()
    tmp = Path(tempfile.mkdtemp(prefix="tc-dist-smoke-")).resolve()
    try:
        if tmp.is_relative_to(ROOT):
            raise SmokeError(f"the temporary directory {tmp} is inside the repository")
        step(f"build {DIST_NAME} {version} (sdist, then the wheel from it); twine check")
        wheel, sdist = build(args.dist.resolve())
        step("the files in the wheel and the sdist")
        check_contents(wheel, sdist, version)
        step("install the wheel into a clean virtualenv")
        python = make_venv(tmp, wheel)
        step("the smoke project, on the installed wheel")
        smoke(python, tmp, version)
    except (SmokeError, subprocess.TimeoutExpired) as exc:
        print(f"\nmake dist FAILED: {exc}", file=sys.stderr)
        print(f"(the temporary directory is kept: {tmp})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"\n(kept {tmp})")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmake dist: OK in {time.monotonic() - STARTED:.0f}s: {wheel.name}, {sdist.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
