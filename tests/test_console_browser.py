"""The console in a real browser: Playwright driving Debian's chromium
(``/usr/bin/chromium``, launched by path: never a downloaded browser) against
a real `dlqd run` on real Postgres. Screenshots of every page go to
``screenshots/`` (git-ignored)."""

from __future__ import annotations

import concurrent.futures
import http.server
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.console_helpers import Console, ids_of, rows_of, seed, start_console
from tests.daemon_helpers import DaemonProcess, scalar, wait_until

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
# flags for a closed network: no background fetches, no first-run, no sandbox as root
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    made = browser.new_context(viewport={"width": 1400, "height": 1000})
    made.set_default_timeout(15_000)
    yield made
    made.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def run(call: Callable[..., Any], *args: Any) -> Any:
    """An async helper, on a thread of its own (Playwright's sync API keeps an
    event loop running in this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, call, *args).result()


def console_with(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], rows: list[Any]
) -> Console:
    seed(db_url, rows)
    console: Console = run(start_console, db_url, tmp_path, daemons)

    async def parked() -> bool:
        return int(await scalar(db_url, "SELECT count(*) FROM dlqd_entry_state")) >= len(rows)

    run(wait_until, parked, 30)
    return console


def sign_in(page: Page, console: Console, token: str, then: str = "/") -> None:
    page.goto(console.url + then)
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page.get_by_test_id("identity")).to_be_visible()


def test_find_understand_and_replay_a_dead_job_in_three_clicks(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess], context: BrowserContext
) -> None:
    rows = rows_of("shop", 8) + rows_of("crm", 5, type="sms.send", error_reason="bounced")
    rows[3]["payload"] = {"to": "vip@example.com", "password": "hunter2", "order": {"id": 7}}
    console = console_with(sink_db, tmp_path, daemons, rows)
    page = context.new_page()
    sign_in(page, console, "ops-token")
    shot(page, "overview")
    # the overview shows the table's own numbers
    expect(page.get_by_test_id("pending")).to_have_text("13")
    expect(page.get_by_test_id("parked")).to_have_text("8")  # the emails, by policy
    expect(page.locator("svg.chart")).to_be_visible()
    # click 1: a group of the overview, the list filtered to it
    page.click("text=email.send")
    expect(page).to_have_url(re.compile(r"/jobs\?app_id=shop&type=email\.send"))
    expect(page.get_by_test_id("total")).to_have_text("8")
    # a glob and a payload search narrow it to one row
    page.fill("#f-app", "sh*")
    page.fill("#f-q", '{"to": "vip@example.com"}')
    page.click("text=Search")
    expect(page.get_by_test_id("total")).to_have_text("1")
    shot(page, "jobs-filtered")
    target = str(
        run(scalar, sink_db, "SELECT id FROM job_dlq WHERE payload->>'to' = 'vip@example.com'")
    )
    # click 2: the row; it says what it is, what the policies say, and masks the secret
    page.click(f"a[href='/jobs/{target}']")
    expect(page.get_by_test_id("payload")).to_contain_text('"to": "vip@example.com"')
    expect(page.get_by_test_id("payload")).to_contain_text('"password": "•••"')
    expect(page.get_by_test_id("payload")).not_to_contain_text("hunter2")
    expect(page.locator("ul.explain")).to_contain_text("verdict: parked by policy 'hold-email'")
    expect(page.locator("ol.timeline")).to_be_visible()
    shot(page, "job")
    # click 3: replay it (through the sink policy's target, with a reason)
    page.select_option("#via", "sink")
    page.fill("#reason", "customer called")
    page.get_by_test_id("replay").click()
    expect(page.locator(".flash")).to_have_text("Replayed.")
    history = page.get_by_test_id("history")
    expect(history).to_contain_text("alice")
    expect(history).to_contain_text("customer called")
    expect(history).to_contain_text("replayed")
    shot(page, "job-replayed")
    # it left the list
    page.goto(console.url + "/jobs?app_id=shop")
    expect(page.get_by_test_id("total")).to_have_text("7")
    expect(page.locator(f"a[href='/jobs/{target}']")).to_have_count(0)
    with psycopg.connect(sink_db) as conn:
        assert conn.execute("SELECT dlq_id::text FROM sink").fetchall() == [(target,)]
    # the overview refreshes itself: a new dead letter appears without a reload
    page.goto(console.url + "/")
    expect(page.get_by_test_id("pending")).to_have_text("12")
    seed(sink_db, rows_of("late", 3, type="push.send"))
    expect(page.get_by_test_id("pending")).to_have_text("15", timeout=20_000)
    page.goto(console.url + "/policies")
    expect(page.locator("table")).to_contain_text("hold-email")
    shot(page, "policies")


def test_a_redrive_of_1000_rows_with_progress_and_cancel(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess], context: BrowserContext
) -> None:
    console = console_with(sink_db, tmp_path, daemons, rows_of("shop", 1000))
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, console, "ops-token", then="/jobs?type=email.*")
    expect(page.get_by_test_id("total")).to_have_text("1,000")
    page.get_by_test_id("redrive-all").click()
    # the dry-run count, then a confirmation
    expect(page.get_by_test_id("matched")).to_have_text("1,000")
    page.select_option("#via", "sink")
    page.fill("#rate", "40")
    page.fill("#reason", "relay fixed")
    shot(page, "redrive-confirm")
    page.get_by_test_id("start").click()
    expect(page.locator(".flash")).to_contain_text("Redrive started")
    cell = page.get_by_test_id("replayed").first

    def replayed_now() -> int:
        return int((cell.text_content() or "0").replace(",", ""))

    # the page refreshes itself: the count moves without a reload
    expect(cell).not_to_have_text("0", timeout=20_000)
    first = replayed_now()
    expect(cell).not_to_have_text(f"{first:,}", timeout=20_000)
    assert replayed_now() > first
    shot(page, "redrive-running")
    # half-way: cancel
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=replayed]')"
        ".textContent.replace(/,/g, '')) >= 150",
        timeout=30_000,
    )
    page.reload()
    page.click("text=Cancel")
    expect(page.locator(".flash")).to_contain_text("Cancel asked")
    expect(page.locator("td .badge").first).to_have_text("cancelled", timeout=20_000)
    shot(page, "redrive-cancelled")
    reported = replayed_now()
    assert 150 <= reported < 1000
    with psycopg.connect(sink_db) as conn:
        sunk, distinct, marked, logged = (
            conn.execute(
                """SELECT (SELECT count(*) FROM sink), (SELECT count(DISTINCT dlq_id) FROM sink),
                      (SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL),
                      (SELECT count(*) FROM dlqd_replay_log
                        WHERE redrive_id IS NOT NULL AND outcome = 'replayed'
                          AND actor = 'alice' AND reason = 'relay fixed')"""
            ).fetchone()
            or ()
        )
    assert sunk == distinct == marked == logged == reported


def test_a_viewer_sees_no_action_and_its_forged_post_is_refused(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess], context: BrowserContext
) -> None:
    console = console_with(sink_db, tmp_path, daemons, rows_of("shop", 3))
    target = ids_of(sink_db, "shop")[0]
    page = context.new_page()
    sign_in(page, console, "view-token", then=f"/jobs/{target}")
    expect(page.locator("h1")).to_contain_text(target)
    expect(page.get_by_test_id("replay")).to_have_count(0)
    expect(page.locator("form[action$='/park']")).to_have_count(0)
    shot(page, "job-as-viewer")
    page.goto(console.url + "/jobs")
    expect(page.get_by_test_id("redrive-all")).to_have_count(0)
    expect(page.locator("input[name=id]")).to_have_count(0)
    # a POST forged from the page itself, with the session's own CSRF token
    status = page.evaluate(
        """async (id) => {
            const csrf = document.querySelector('input[name=csrf]').value;
            const body = new URLSearchParams({csrf, via: 'sink'});
            const answer = await fetch(`/jobs/${id}/replay`, {method: 'POST', body});
            return answer.status;
        }""",
        target,
    )
    assert status == 403
    assert run(scalar, sink_db, "SELECT count(*) FROM sink") == 0


def test_a_tenant_token_cannot_see_or_act_on_another_tenant(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess], context: BrowserContext
) -> None:
    console = console_with(sink_db, tmp_path, daemons, rows_of("shop", 4) + rows_of("crm", 3))
    crm = ids_of(sink_db, "crm")
    page = context.new_page()
    sign_in(page, console, "shop-token")
    expect(page.get_by_test_id("pending")).to_have_text("4")
    expect(page.locator("main")).not_to_contain_text("crm")
    shot(page, "overview-as-tenant")
    # by URL
    answer = page.goto(console.url + f"/jobs/{crm[0]}")
    assert answer is not None
    assert answer.status == 404
    expect(page.locator("main")).not_to_contain_text("crm")
    # by filter
    page.goto(console.url + "/jobs?app_id=crm")
    expect(page.get_by_test_id("empty")).to_be_visible()
    page.goto(console.url + "/jobs?app_id=*")
    expect(page.get_by_test_id("total")).to_have_text("4")
    # by forged ids, from the tenant's own session
    statuses = page.evaluate(
        """async (ids) => {
            const csrf = document.querySelector('input[name=csrf]').value;
            const one = await fetch(`/jobs/${ids[0]}/replay`, {method: 'POST',
                body: new URLSearchParams({csrf, via: 'sink'})});
            const form = new URLSearchParams({csrf, action: 'replay', via: 'sink'});
            ids.forEach((id) => form.append('id', id));
            const bulk = await fetch('/jobs/actions', {method: 'POST', body: form,
                headers: {'Accept': 'application/json'}});
            return [one.status, (await bulk.json()).replayed];
        }""",
        crm,
    )
    assert statuses == [404, 0]
    with psycopg.connect(sink_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL"
        ).fetchone() == (0,)


class _EvilPage(http.server.BaseHTTPRequestHandler):
    """A page of another origin whose form posts to the console on load."""

    target = ""

    def do_GET(self) -> None:
        body = (
            f'<form id="f" method="post" action="{self.target}">'
            '<input name="via" value="sink"><input name="csrf" value="guess"></form>'
            '<script>document.getElementById("f").submit()</script>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["same-site", "cross-site"])
def test_a_form_of_another_origin_cannot_act(
    sink_db: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    context: BrowserContext,
    host: str,
) -> None:
    console = console_with(sink_db, tmp_path, daemons, rows_of("shop", 1))
    [target] = ids_of(sink_db, "shop")
    page = context.new_page()
    sign_in(page, console, "ops-token")
    handler = type("Evil", (_EvilPage,), {"target": f"{console.url}/jobs/{target}/replay"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with page.expect_navigation(url=re.compile(r"/jobs/.*/replay")) as navigation:
            page.goto(f"http://{host}:{server.server_address[1]}/")
        response = navigation.value
        assert response is not None
        # same site (another port): the cookie goes, Sec-Fetch-Site stops it;
        # another site: SameSite=Strict keeps the cookie home
        assert response.status == (403 if host == "127.0.0.1" else 401)
    finally:
        server.shutdown()
    assert run(scalar, sink_db, "SELECT count(*) FROM sink") == 0


def test_reading_and_a_single_replay_work_without_javascript(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess], browser: Browser
) -> None:
    console = console_with(sink_db, tmp_path, daemons, rows_of("shop", 3))
    target = ids_of(sink_db, "shop")[1]
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        sign_in(page, console, "ops-token")
        expect(page.get_by_test_id("pending")).to_have_text("3")
        page.click("text=Jobs")
        expect(page.get_by_test_id("total")).to_have_text("3")
        page.click(f"a[href='/jobs/{target}']")
        page.select_option("#via", "sink")
        page.get_by_test_id("replay").click()
        expect(page.locator(".flash")).to_have_text("Replayed.")
        expect(page.get_by_test_id("history")).to_contain_text("alice")
        shot(page, "job-without-javascript")
    finally:
        context.close()
    with psycopg.connect(sink_db) as conn:
        assert conn.execute("SELECT dlq_id::text FROM sink").fetchall() == [(target,)]
