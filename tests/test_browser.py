"""The admin flows in a real browser: Debian's Chromium driven by Playwright against the
live server. Logs in, runs a flush action, presses the dashboard's buttons (a warmup runs
on a real Celery worker), and checks the page and the cache afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.cache_fixtures import l2_keys
from tests.ops_helpers import change_behind_the_cache, read, read_cached
from tests.processes import wait_for
from tests.testapp.factories import GlobalModelFactory, UserFactory
from tests.testapp.models import GlobalModel, User
from tiered_cache import maintenance
from tiered_cache.registry import cached_models

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no outside network: no sandbox, no background traffic.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "password"  # the factories' password


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: make browser")
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls
    # are still plain synchronous code.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            browser.close()


@pytest.fixture
def page(browser: Browser, live_server: Any) -> Iterator[Page]:
    context = browser.new_context(base_url=live_server.url)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def log_in(page: Page) -> None:
    UserFactory(username="root", is_staff=True, is_superuser=True)
    page.goto("/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()
    expect(page.locator("#tiered-cache-dashboard-link")).to_be_visible()


def message(page: Page) -> Any:
    return expect(page.locator("ul.messagelist"))


def test_flush_selected_action(page: Page) -> None:
    log_in(page)
    alice = UserFactory(username="alice", first_name="old")
    bob = UserFactory(username="bob", first_name="old")
    for u in (alice, bob):
        read(User.objects, pk=u.pk)
        read(User.objects, email=u.email)
        change_behind_the_cache(u, "new")

    page.goto("/admin/testapp/user/")
    page.check(f'input[name="_selected_action"][value="{alice.pk}"]')
    page.select_option('select[name="action"]', label="Flush selected users from cache")
    page.click('button[name="index"]')

    message(page).to_contain_text("Flushed 1 user from the cache in every process: alice.")
    assert User.objects.get_cached(pk=alice.pk).first_name == "new"
    assert User.objects.get_cached(email=alice.email).first_name == "new"
    assert read_cached(User.objects, pk=bob.pk).first_name == "old"

    # "Flush all" ignores which rows were picked.
    page.check(f'input[name="_selected_action"][value="{alice.pk}"]')
    page.select_option('select[name="action"]', label="Flush all user cache entries")
    page.click('button[name="index"]')
    message(page).to_contain_text("Flushed all user cache entries (testapp.User")
    assert User.objects.get_cached(pk=bob.pk).first_name == "new"


@pytest.mark.usefixtures("worker")
def test_dashboard_buttons(page: Page, tmp_path: Any) -> None:
    log_in(page)
    users = UserFactory.create_batch(3)
    gm = GlobalModelFactory()
    for u in users:
        for _ in range(3):
            read(User.objects, pk=u.pk)
    read(GlobalModel.objects, name=gm.name)

    page.click("#tiered-cache-dashboard-link >> text=Cache dashboard")
    expect(page.locator("h1")).to_have_text("Cache dashboard")
    user_row = page.locator("#tc-testapp-user")
    gm_row = page.locator("#tc-testapp-globalmodel")
    expect(user_row.locator(".tc-lookups")).to_have_text("pk, email")
    expect(user_row.locator(".tc-l2")).to_have_text("3")
    expect(gm_row.locator(".tc-l2")).to_have_text("1")
    expect(user_row.locator('svg rect[data-tier="L1"]')).to_have_count(1)
    expect(user_row.locator('svg rect[data-tier="database"]')).to_have_count(1)
    expect(page.locator("#tc-bus")).to_have_text("live")
    expect(page.locator("#tc-breaker")).to_have_text("closed")
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # Flush one model.
    gm_row.get_by_role("button", name="Flush testapp.GlobalModel").click()
    message(page).to_contain_text("Flushed every testapp.GlobalModel entry (all processes).")
    expect(gm_row.locator(".tc-l2")).to_have_text("0")
    expect(user_row.locator(".tc-l2")).to_have_text("3")
    assert l2_keys(GlobalModel) == [] and len(l2_keys(User)) == 3

    # Warm up: queued on Celery, run by the worker.
    page.locator("#tc-testapp-user").get_by_role("button", name="Warm up testapp.User").click()
    message(page).to_contain_text("Warmup of testapp.User queued on Celery (task ")
    assert wait_for(lambda: "testapp.user" in maintenance.last_runs()["warmup"], 30), "timed out"
    n = User.objects.count()
    assert maintenance.last_runs()["warmup"]["testapp.user"]["stored"] == n
    assert len(l2_keys(User)) == n
    page.reload()
    expect(user_row.locator(".tc-l2")).to_have_text(str(n))
    expect(user_row.locator(".tc-last-warmup")).to_contain_text(f"stored {n}, refused 0")

    # Clean up.
    page.click("#tc-cleanup")
    message(page).to_contain_text("Cleanup scanned ")
    expect(page.locator("#tc-last-cleanup")).not_to_have_text("never")

    # Flush everything.
    page.click("#tc-flush-all")
    labels = ", ".join(m._meta.label for m in cached_models())
    message(page).to_contain_text(f"Flushed every cached model: {labels}.")
    for label in ("user", "provider", "globalmodel", "providermodel", "flow"):
        expect(page.locator(f"#tc-testapp-{label} .tc-l2")).to_have_text("0")
    assert l2_keys(User) == []


def test_dashboard_trends_and_inspect_form(page: Page, tmp_path: Any) -> None:
    """The last hour's chart has points once reads were pushed, and the inspect form shows
    a cached row's tiers."""
    log_in(page)
    users = UserFactory.create_batch(3)
    for u in users:
        for _ in range(5):
            read(User.objects, pk=u.pk)
    missing = users[-1].pk + 1000
    for _ in range(2):
        with pytest.raises(User.DoesNotExist):
            User.objects.get_cached(pk=missing)

    page.goto("/admin/tiered_cache/pendinginvalidation/dashboard/")
    trend = page.locator("#tc-trend-testapp-user")
    # The view pushed this process's counters (the live server runs in it) before reading.
    points = trend.locator("svg.tc-trend g.tc-trend-minute")
    expect(points.first).to_be_attached()
    rate = float(points.last.get_attribute("data-reads-per-second") or 0)
    assert rate > 0
    expect(trend.locator('svg rect[data-tier="L1"]').first).to_be_attached()
    expect(trend.locator('svg rect[data-tier="database"]').first).to_be_attached()
    expect(trend.locator(".tc-summary")).to_contain_text("reads in the last hour")
    expect(page.locator("#tc-testapp-user .tc-l2-memory")).to_contain_text("≈")
    page.screenshot(path=str(tmp_path / "trends.png"), full_page=True)

    # Inspect a cached row.
    page.select_option("#tc-inspect-model", "testapp.User")
    page.fill("#tc-inspect-lookup", f"pk={users[0].pk}")
    page.click("#tc-inspect-submit")
    verdict = page.locator("#tc-inspect-verdict")
    expect(verdict).to_contain_text(f"testapp.User pk={users[0].pk}")
    expect(verdict).to_contain_text("Would be served: yes, from L1 (this process)")
    expect(page.locator("#tc-inspect-l1")).to_have_attribute("data-served", "yes")
    expect(page.locator("#tc-inspect-l2")).to_have_attribute("data-valid", "yes")
    expect(page.locator("#tc-inspect-l2")).to_contain_text("MAC-covered expiry")
    expect(page.locator("#tc-inspect-db")).to_have_attribute("data-exists", "yes")
    expect(page.locator("#tc-inspect-model")).to_have_value("testapp.User")
    page.screenshot(path=str(tmp_path / "inspect.png"), full_page=True)

    # A remembered absence, then a lookup the model does not declare.
    page.fill("#tc-inspect-lookup", f"pk={missing}")
    page.click("#tc-inspect-submit")
    expect(verdict).to_contain_text("Would be served: yes")
    expect(page.locator("#tc-inspect-l2")).to_contain_text("no such row")
    expect(page.locator("#tc-inspect-db")).to_have_attribute("data-exists", "no")
    page.fill("#tc-inspect-lookup", "first_name=Ann")
    page.click("#tc-inspect-submit")
    expect(page.locator("#tc-inspect-error")).to_contain_text("is not a declared cache lookup")
