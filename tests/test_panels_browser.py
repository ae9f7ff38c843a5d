"""The TieredCache panel in a real django-debug-toolbar, in Debian's Chromium: the demo served
by `manage.py runserver` in a process of its own, with the toolbar as the demo's settings
configure it under DEBUG (tests/panel_settings.py), over this run's test database and Redis.
The suite's own settings keep the toolbar out (its middleware would run in every test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from playwright.sync_api import Browser, Page, expect

from demo_project.demo.factories import FlowInstanceFactory, ModelFactory, UserFactory
from tests.processes import child_env
from tests.test_browser import browser  # noqa: F401  (the fixture: Chromium, launched once)

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def demo_server(django_db_setup: Any, django_db_blocker: Any) -> Iterator[str]:
    """`manage.py runserver` (threaded, so each request runs on a thread of its own) on
    tests.panel_settings; its URL."""
    port = _free_port()
    with django_db_blocker.unblock():
        env = {
            **os.environ,
            **child_env(),
            "DJANGO_SETTINGS_MODULE": "tests.panel_settings",
            "DJANGO_DEBUG": "1",
            "PYTHONUNBUFFERED": "1",
        }
    cmd = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*cmd, "--noreload", "--skip-checks"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"runserver exited:\n{proc.stdout.read() if proc.stdout else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("runserver did not listen within 60 s")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def page(browser: Browser, demo_server: str) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(base_url=demo_server)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def open_panel(page: Page, path: str) -> Any:
    """Load `path`, open the toolbar's TieredCache panel; its content element."""
    page.goto(path)
    expect(page.locator("#djDebugToolbar")).to_be_visible()
    page.locator("#djdt-TieredCachePanel a").click()
    content = page.locator("#TieredCachePanel")
    expect(content).to_be_visible()
    expect(content.locator("#tc-panel-summary")).to_be_visible()
    return content


def tiers(panel: Any) -> list[str]:
    return [t.strip() for t in panel.locator("tr.tc-call .tc-tier").all_inner_texts()]


def test_the_panel_lists_each_read_with_its_tier(page: Page, tmp_path: Path) -> None:
    user = UserFactory.create_batch(3)[0]
    ModelFactory()
    FlowInstanceFactory()

    # First visit: every row is read from the database, the absent one too.
    panel = open_panel(page, "/tour/")
    rows = panel.locator("tr.tc-call")
    expect(rows).to_have_count(6)
    apis = rows.locator("td:nth-child(2)").all_inner_texts()
    assert apis == [
        "get_cached",
        "get_cached",
        "get_cached",
        "get_many_cached",
        "get_cached",
        "cached function",
    ]
    first = tiers(panel)
    assert first[0] == "database" and first[2] == "database", first
    expect(rows.nth(2).locator(".tc-result")).to_have_text("does not exist")
    expect(rows.nth(0).locator(".tc-lookup")).to_have_text(f"pk={user.pk}")
    expect(rows.nth(0).locator(".tc-model")).to_have_text("demo.user")
    expect(rows.nth(0).locator(".tc-where")).to_contain_text("demo/views.py")
    expect(panel.locator("#tc-panel-no-invalidations")).to_be_visible()

    # Again: all from L1, the absence remembered.
    panel = open_panel(page, "/tour/")
    assert tiers(panel) == ["L1", "L1", "negative", "L1 3", "L1", "L1"]
    subtitle = page.locator("#djdt-TieredCachePanel small")
    expect(subtitle).to_have_text("8 reads, 7 L1, 1 negative")
    page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)

    # A write first: its invalidation is listed, and the row is read from the database.
    panel = open_panel(page, "/tour/?touch=1")
    invalidation = panel.locator("tr.tc-invalidation")
    expect(invalidation).to_have_count(1)
    expect(invalidation.locator(".tc-models")).to_have_text("demo.user")
    expect(invalidation.locator(".tc-rows")).to_have_text(str(user.pk))
    assert tiers(panel)[0] == "database"


def test_async_views_reads_are_the_requests(page: Page) -> None:
    """An async view (run by the WSGI server through async_to_sync): L1 hits on the event
    loop and reads in sync_to_async's thread are all recorded under its request."""
    UserFactory.create_batch(2)
    ModelFactory()
    open_panel(page, "/async/tour/")
    panel = open_panel(page, "/async/tour/")
    apis = panel.locator("tr.tc-call td:nth-child(2)").all_inner_texts()
    assert apis == ["aget_cached", "aget_cached", "aget_many_cached", "cached function"]
    assert tiers(panel) == ["L1", "negative", "L1 2", "L1"]


def test_the_demo_adds_the_panel_to_the_default_panels() -> None:
    from debug_toolbar.settings import PANELS_DEFAULTS

    from demo_project import settings as demo

    if not demo.DEBUG_TOOLBAR:
        pytest.skip("DJANGO_DEBUG is off: the demo runs without the toolbar")
    assert demo.DEBUG_TOOLBAR_PANELS == [*PANELS_DEFAULTS, "tiered_cache.panels.TieredCachePanel"]
    assert "debug_toolbar" not in settings.INSTALLED_APPS  # the suite runs without it
