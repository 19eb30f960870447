"""The dashboard in headless Chromium against a live stack (real PostgreSQL, NATS, API, executor,
projector, gateway): the issue's scenario, roles, spec errors, sign-in, lost connections and a
20,000-line log."""

from __future__ import annotations

import re
import time
import uuid
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Page, expect

from tests.dashboard.conftest import NewPage
from tests.dashboard.stack import LiveStack

pytestmark = pytest.mark.integration

ACTION_NAMES = ("Approve", "Reject", "Cancel", "Stop", "Pause", "Resume")
LIVE = 30_000  # ms: how long a live change may take to show (generous: the machine is shared)

GATED = """\
variables: {VERSION: dev}
stages:
  - id: build
    jobs:
      - name: compile
        steps:
          - name: hello
            run: "for i in 1 2 3 4 5 6; do printf '\\\\033[32mline %s\\\\033[0m ok\\\\n' $i; sleep 1.5; done"
      - name: test
        needs: [compile]
        steps:
          - {name: unit, run: "echo unit ok"}
      - name: ship
        needs: [test]
        steps:
          - {name: gate, approval: {message: "Ship it?"}}
          - {name: deploy, run: "echo shipped $VERSION"}
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_pipeline(page: Page, name: str, yaml: str) -> str:
    """Through the create form of the pipelines page; returns the new pipeline's id."""
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_label(re.compile(r"^Definition \(YAML")).fill(yaml)
    await page.get_by_role("button", name="Create pipeline").click()
    await page.wait_for_url(re.compile(r"/pipelines/[0-9a-f-]{36}$"), timeout=LIVE)
    return urlsplit(page.url).path.rsplit("/", 1)[1]


async def status_is(page: Page, text: str) -> None:
    await expect(page.get_by_test_id("run-status")).to_contain_text(text, timeout=LIVE)


async def test_member_watches_a_run_live_and_an_admin_approval_turns_it_succeeded_without_reload(
    stack: LiveStack, open_page: NewPage
) -> None:
    started = time.monotonic()
    member = await open_page("/", token=stack.token("member", sub="alice"))
    loaded = time.monotonic() - started
    print(f"\npipelines page loaded (sign-in with ?token=, /info, lists) in {loaded * 1000:.0f} ms")
    assert loaded < 10, "the first page took over 10 s"
    # The token left the address bar; the header says who, where and what role.
    assert "token=" not in member.url
    await expect(member.get_by_test_id("who")).to_contain_text("alice")
    await expect(member.get_by_test_id("org")).to_have_text(stack.system.org)
    await expect(member.get_by_test_id("role")).to_have_text("member")
    await expect(member.get_by_role("button", name="Sign out")).to_be_visible()

    pipeline_id = await create_pipeline(member, unique("gated"), GATED)
    graph = member.get_by_test_id("graph")
    for job in ("compile", "test", "ship"):
        await expect(graph.locator("text", has_text=job)).to_have_count(1)
    assert await graph.locator("path.edge").count() == 2  # test needs compile, ship needs test

    await member.get_by_role("button", name="Trigger run").click()
    await member.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}$"), timeout=LIVE)
    run_url = member.url
    await member.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    log = member.get_by_test_id("log")
    # Log lines arrive while the step still runs: the first line is there before the run moves on.
    await expect(log).to_contain_text("line 1 ok", timeout=LIVE)
    assert "line 6" not in await log.inner_text()
    await expect(member.get_by_test_id("run-status")).to_contain_text("running")
    # ANSI colours are classes, not escape codes.
    assert await log.locator(".a32", has_text="line 1").count() == 1
    await expect(log).to_contain_text("line 6 ok", timeout=LIVE)
    await status_is(member, "waiting for approval")
    # A member may not act on runs: no action buttons at all.
    for name in ACTION_NAMES:
        assert await member.get_by_role("button", name=name, exact=True).count() == 0

    admin = await open_page(urlsplit(run_url).path, token=stack.token("admin", sub="carol"))
    await status_is(admin, "waiting for approval")
    await expect(admin.get_by_test_id("role")).to_have_text("admin")
    # Each action name is one control; those the status does not allow are disabled.
    for name in ACTION_NAMES:
        assert await admin.get_by_role("button", name=name, exact=True).count() == 1, name
        assert await admin.get_by_role("link", name=name, exact=True).count() == 0, name
    for name in ("Cancel", "Stop", "Approve", "Reject"):
        await expect(admin.get_by_role("button", name=name, exact=True)).to_be_enabled()
    for name in ("Pause", "Resume"):
        await expect(admin.get_by_role("button", name=name, exact=True)).to_be_disabled()
    # By keyboard: type the comment, Tab to Approve, Enter.
    await admin.get_by_label("Comment or reason (optional)").focus()
    await admin.keyboard.type("looks good")
    await admin.keyboard.press("Tab")
    await expect(admin.get_by_role("button", name="Approve", exact=True)).to_be_focused()
    await admin.keyboard.press("Enter")

    await status_is(member, "succeeded")
    assert await member.evaluate("window.__sameDocument === true"), "the member's page reloaded"
    await expect(member.get_by_test_id("log")).to_contain_text("shipped dev", timeout=LIVE)
    await expect(member.get_by_test_id("history")).to_contain_text("carol approved", timeout=LIVE)
    await expect(member.get_by_test_id("history")).to_contain_text("looks good")
    # The log of one step only.
    await member.get_by_role("button", name=re.compile(r"^Show the log of step unit")).click()
    await expect(log).to_contain_text("unit ok")
    await expect(log).not_to_contain_text("line 1 ok")
    await member.get_by_role("button", name="Whole log").click()
    await expect(log).to_contain_text("line 1 ok")
    await status_is(admin, "succeeded")
    for name in ACTION_NAMES:
        await expect(admin.get_by_role("button", name=name, exact=True)).to_be_disabled()

    # The pipelines list shows the last run's status; the runs list has the run, newest first.
    await member.goto(f"{stack.api_url}/")
    row = member.locator(f"tr[data-pipeline='{pipeline_id}']")
    await expect(row).to_contain_text("succeeded", timeout=LIVE)
    await member.goto(f"{stack.api_url}/runs")
    await expect(member.get_by_test_id("runs-table").locator("tbody tr").first).to_contain_text("succeeded")


async def test_a_viewer_sees_no_action_buttons_and_no_forms(stack: LiveStack, open_page: NewPage) -> None:
    pipeline = await stack.system.create_pipeline(
        [{"id": "gate", "name": "Gate", "type": "approval", "config": {"message": "ok?"}}], name=unique("viewer")
    )
    run = await stack.system.trigger(pipeline["id"])
    await stack.system.wait_status(pipeline["id"], run["id"], "waiting_approval")
    viewer = await open_page(f"/runs/{run['id']}", token=stack.token("viewer"))
    await status_is(viewer, "waiting for approval")
    await expect(viewer.get_by_test_id("role")).to_have_text("viewer")
    for name in ACTION_NAMES:
        assert await viewer.get_by_role("button", name=name, exact=True).count() == 0, name
    await viewer.goto(f"{stack.api_url}/pipelines/{pipeline['id']}")
    await expect(viewer.get_by_role("heading", name=pipeline["name"])).to_be_visible()
    assert await viewer.get_by_role("button", name="Trigger run").count() == 0
    assert await viewer.get_by_role("button", name="Save spec").count() == 0
    await viewer.goto(f"{stack.api_url}/")
    await expect(viewer.get_by_text("creating one needs the member role")).to_be_visible()
    assert await viewer.get_by_role("button", name="Create pipeline").count() == 0


async def test_an_invalid_spec_shows_every_error_at_its_path(stack: LiveStack, open_page: NewPage) -> None:
    member = await open_page("/", token=stack.token("member"))
    name = unique("invalid")
    await member.get_by_label("Name", exact=True).fill(name)
    bad = (
        "stages:\n  - id: build\n    jobs:\n      - name: a\n        needs: [nowhere]\n"
        "        steps: []\n    colour: red\n"
    )
    await member.get_by_label(re.compile(r"^Definition \(YAML")).fill(bad)
    await member.get_by_role("button", name="Create pipeline").click()
    errors = member.get_by_test_id("spec-errors")
    await expect(errors).to_be_visible(timeout=LIVE)
    text = await errors.inner_text()
    assert "stages[0].colour" in text or "stages.0.colour" in text, text
    assert "nowhere" in text, text
    assert urlsplit(member.url).path == "/"  # nothing was created
    # YAML that does not parse names its line.
    await member.get_by_label(re.compile(r"^Definition \(YAML")).fill("stages:\n  - id: [unclosed\n")
    await member.get_by_role("button", name="Create pipeline").click()
    await expect(member.get_by_test_id("spec-errors")).to_contain_text("line ")

    # On a pipeline's page, Validate shows the errors too, and a valid spec saves a new version.
    pipeline = await stack.system.create_pipeline(
        [{"id": "build", "name": "Build", "type": "script", "config": {"command": "true"}}], name=unique("edit")
    )
    await member.goto(f"{stack.api_url}/pipelines/{pipeline['id']}")
    editor = member.get_by_label("Spec (YAML)")
    await editor.fill("stages:\n  - id: build\n    type: script\n    config: {}\n")
    await member.get_by_role("button", name="Validate").click()
    await expect(member.get_by_test_id("spec-errors")).to_contain_text("stages[0]", timeout=LIVE)
    await editor.fill("stages:\n  - id: build\n    type: script\n    config: {command: 'echo two'}\n")
    await member.get_by_label("Commit message").fill("second")
    await member.get_by_role("button", name="Save spec").click()
    await expect(member.get_by_test_id("spec-saved")).to_contain_text("version 2", timeout=LIVE)
    # The versions and a diff between them.
    await member.get_by_role("button", name="Show diff").click(timeout=LIVE)
    await expect(member.get_by_test_id("diff").locator(".add")).to_contain_text("echo two")


async def test_an_invalid_or_expired_token_returns_to_sign_in_with_a_message(
    stack: LiveStack, open_page: NewPage
) -> None:
    page = await open_page("/", token="not-a-token", wait=False)
    message = page.get_by_test_id("signin-message")
    await expect(message).to_contain_text("invalid token", timeout=LIVE)
    assert "token=" not in page.url
    # Pasting a good token signs in where the person was going.
    await page.get_by_label("Token").fill(stack.token("viewer", sub="vera"))
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_test_id("who")).to_contain_text("vera", timeout=LIVE)

    # A token that expires while the page is open: the gateway ends the session, the page says so.
    expiring = await open_page("/runs", token=stack.token("viewer", ttl=4))
    await expect(expiring.get_by_test_id("runs-table")).to_be_visible()
    await expect(expiring.get_by_test_id("signin-message")).to_contain_text("expired", timeout=LIVE)

    # Sign-out forgets the token: a reload asks for one.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.reload()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


async def test_a_lost_gateway_connection_shows_and_resumes_where_it_left_off(
    stack: LiveStack, open_page: NewPage
) -> None:
    script = "for i in $(seq 1 40); do echo tick-$i; sleep 0.1; done"
    pipeline = await stack.system.create_pipeline(
        [
            {"id": "gate", "name": "Gate", "type": "approval", "config": {"message": "go?"}},
            {"id": "ticks", "name": "Ticks", "type": "script", "config": {"command": script}},
        ],
        name=unique("resume"),
    )
    run = await stack.system.trigger(pipeline["id"])
    page = await open_page(f"/runs/{run['id']}", token=stack.token("admin"))
    await status_is(page, "waiting for approval")
    await expect(page.locator("#live")).to_have_text("Live", timeout=LIVE)
    await stack.stop_gateway()
    await expect(page.locator("#live")).to_contain_text("Connection lost", timeout=LIVE)
    # While the page cannot hear: approve through the API, and the script prints its lines.
    r = await stack.system.client.post(
        f"/api/v1/pipelines/{pipeline['id']}/runs/{run['id']}/approve", headers=stack.system.headers("admin")
    )
    assert r.status_code == 200, r.text
    await stack.system.wait_status(pipeline["id"], run["id"], "succeeded", timeout=60)
    await stack.start_gateway()
    await expect(page.locator("#live")).to_have_text("Live (resumed)", timeout=LIVE)
    await status_is(page, "succeeded")
    log = page.get_by_test_id("log")
    await expect(log).to_contain_text("tick-40", timeout=LIVE)
    # Every line once, in order: the resume replayed what was missed, with no gap and no duplicate.
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download raw log").click()
    text = (await (await download_info.value).path()).read_text()
    ticks = [line for line in text.splitlines() if line.startswith("tick-")]
    assert ticks == [f"tick-{i}" for i in range(1, 41)], ticks


async def test_a_run_with_20000_log_lines_stays_responsive(stack: LiveStack, open_page: NewPage) -> None:
    pipeline = await stack.system.create_pipeline(
        [{"id": "many", "name": "Many", "type": "script", "config": {"command": "seq 1 20000"}}], name=unique("big")
    )
    run = await stack.system.trigger(pipeline["id"])
    await stack.system.wait_status(pipeline["id"], run["id"], "succeeded", timeout=60)
    started = time.monotonic()
    page = await open_page(f"/runs/{run['id']}", token=stack.token("viewer"))
    shown = time.monotonic() - started
    count = page.get_by_test_id("log-count")
    await expect(count).to_have_text(re.compile(r"^200\d\d lines$"), timeout=LIVE)
    all_lines = time.monotonic() - started
    print(f"\nrun page with 20,000 log lines: shown in {shown * 1000:.0f} ms, every line in {all_lines * 1000:.0f} ms")
    # Only the lines in view are in the document.
    assert await page.locator("[data-testid=log] .ln").count() < 200
    # Search finds one line among 20,000 and scrolls to it, quickly.
    t0 = time.monotonic()
    await page.get_by_label("Search the log").fill("19999")
    await expect(page.get_by_test_id("log-matches")).to_have_text("1 of 1 matches")
    await expect(page.locator("[data-testid=log] .ln.cur")).to_contain_text("19999")
    searched = time.monotonic() - t0
    print(f"search over 20,000 lines: {searched * 1000:.0f} ms")
    assert searched < 5
    # Unfollow / Follow, and the raw log as a file.
    await expect(page.get_by_role("button", name="Follow", exact=True)).to_be_visible()  # search stopped following
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download raw log").click()
    download = await download_info.value
    raw = (await download.path()).read_text()
    numbers = [line for line in raw.splitlines() if line.isdigit()]
    assert numbers == [str(i) for i in range(1, 20001)], (len(numbers), numbers[:3], numbers[-3:], raw[:300])
    # The page still answers at once.
    t0 = time.monotonic()
    await page.get_by_role("button", name="Follow", exact=True).click()
    await expect(page.get_by_role("button", name="Unfollow", exact=True)).to_be_visible()
    await expect(page.locator("[data-testid=log] .ln").last).to_contain_text("Stage Many (many) succeeded")
    assert time.monotonic() - t0 < 5


async def test_deployments_show_what_is_deployed_where_and_the_history_filters(
    stack: LiveStack, open_page: NewPage
) -> None:
    system = stack.system
    admin = system.headers("admin")

    async def post(path: str, body: dict[str, object]) -> dict[str, str]:
        r = await system.client.post(path, json=body, headers=admin)
        assert r.status_code == 201, r.text
        out: dict[str, str] = r.json()
        return out

    component = await post("/api/v1/components", {"name": unique("checkout")})
    staging = await post(
        "/api/v1/environments",
        {"name": unique("staging"), "deployer": {"type": "command", "command": "echo deploying"}},
    )
    production = await post(
        "/api/v1/environments", {"name": unique("production"), "deployer": {"type": "command", "command": "exit 3"}}
    )
    pipelines = {
        env["id"]: await system.create_pipeline(
            [
                {
                    "id": "ship",
                    "name": "Ship",
                    "type": "deploy",
                    "config": {"componentId": component["id"], "environmentId": env["id"]},
                }
            ],
            name=unique("deployer"),
        )
        for env in (staging, production)
    }
    page = await open_page("/deployments", token=stack.token("viewer"))
    matrix = page.get_by_test_id("deployed-matrix")
    await expect(matrix.locator(f"td[data-cell='{component['name']}|{staging['name']}']")).to_have_text("not deployed")
    # Deployments happen while the page is open: it follows them live.
    ok = await system.trigger(pipelines[staging["id"]]["id"], variables={"VERSION": "1.4.2"})
    bad = await system.trigger(pipelines[production["id"]]["id"], variables={"VERSION": "1.5.0"})
    await system.wait_status(ok["pipelineId"], ok["id"], "succeeded", timeout=60)
    await system.wait_status(bad["pipelineId"], bad["id"], "failed", timeout=60)
    cell = matrix.locator(f"td[data-cell='{component['name']}|{staging['name']}']")
    await expect(cell).to_contain_text("1.4.2", timeout=LIVE)
    await expect(matrix.locator(f"td[data-cell='{component['name']}|{production['name']}']")).to_have_text(
        "not deployed"
    )
    history = page.locator("table").last
    await expect(history.locator("tbody tr").filter(has_text=component["name"])).to_have_count(2, timeout=LIVE)
    await page.get_by_label("Status").select_option("failed")
    await page.get_by_label("Environment").select_option(label=production["name"])
    await expect(history.locator("tbody tr")).to_have_count(1)
    await expect(history.locator("tbody tr")).to_contain_text("1.5.0")

    # The runs list filters by status too, and the filter is in the address.
    await page.goto(f"{stack.api_url}/runs")
    await page.get_by_label("Status").select_option("failed")
    rows = page.get_by_test_id("runs-table").locator("tbody tr")
    # The unfiltered table stays until the filtered answer replaces it (its first row may be the failed run).
    await expect(rows.filter(has_text="succeeded")).to_have_count(0)
    await expect(rows.first).to_contain_text("failed")
    for text in await rows.all_inner_texts():
        assert "failed" in text and "succeeded" not in text, text
    assert urlsplit(page.url).query == "status=failed"


async def test_an_admin_rejects_with_a_reason_and_cancels_and_the_run_page_says_who_and_why(
    stack: LiveStack, open_page: NewPage
) -> None:
    pipeline = await stack.system.create_pipeline(
        [{"id": "gate", "name": "Gate", "type": "approval", "config": {"message": "ok?"}}], name=unique("reject")
    )
    first = await stack.system.trigger(pipeline["id"])
    second = await stack.system.trigger(pipeline["id"])
    admin = await open_page(f"/runs/{first['id']}", token=stack.token("admin", sub="dana"))
    await status_is(admin, "waiting for approval")
    await admin.get_by_label("Comment or reason (optional)").fill("not on a Friday")
    await admin.get_by_role("button", name="Reject", exact=True).click()
    await status_is(admin, "failed")
    await expect(admin.get_by_test_id("history")).to_contain_text("dana rejected", timeout=LIVE)
    await expect(admin.get_by_test_id("history")).to_contain_text("not on a Friday")
    # Cancel another waiting run, without a reason.
    await admin.goto(f"{stack.api_url}/runs/{second['id']}")
    await status_is(admin, "waiting for approval")
    await admin.get_by_role("button", name="Cancel", exact=True).click()
    await status_is(admin, "cancelled")
    await expect(admin.get_by_test_id("history")).to_contain_text("dana cancelled the run", timeout=LIVE)
    for name in ACTION_NAMES:
        await expect(admin.get_by_role("button", name=name, exact=True)).to_be_disabled()
