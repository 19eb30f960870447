from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests import servers
from tests.dashboard.browser import ARTIFACTS_ENV, LAUNCH_ARGS, NoChromium, chromium_path
from tests.dashboard.stack import LiveStack, live_stack

NewPage = Callable[..., Awaitable[Page]]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    # Lets the `open_page` fixture see, at teardown, whether its test failed.
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveStack]:
    # A database of its own on the session's server: the 20,000-line run and the rest stay out of
    # the shared database that other suites read whole (a full read-model rebuild, for one).
    with servers.fresh_database(database_url, prefix="pipelines_dashboard") as own:
        async with live_stack(own, nats_url, tmp_path_factory.mktemp("data")) as s:
            yield s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    try:
        executable = chromium_path()
    except NoChromium as exc:
        pytest.fail(str(exc))  # never a skip: CI must have a browser
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


def artifacts_dir() -> Path:
    root = Path(os.environ.get(ARTIFACTS_ENV) or Path(tempfile.gettempdir()) / "pipelines-dashboard-artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest_asyncio.fixture(loop_scope="session")
async def open_page(browser: Browser, stack: LiveStack, request: pytest.FixtureRequest) -> AsyncIterator[NewPage]:
    """`await open_page(path, token=...)`: a page in a browser context of its own (its own
    sessionStorage: another person), opened at `path` on the API's port. Failing tests leave a
    screenshot of every page they opened (the path is printed)."""
    contexts: list[tuple[BrowserContext, Page]] = []
    errors: list[str] = []

    async def new_page(path: str = "/", *, token: str | None = None, wait: bool = True) -> Page:
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
        contexts.append((context, page))
        if path is not None:
            sep = "&" if "?" in path else "?"
            await page.goto(stack.api_url + path + (f"{sep}token={token}" if token else ""))
            if wait:
                await page.wait_for_selector("body[data-ready]")
        return page

    yield new_page
    failed = any(
        getattr(request.node, f"rep_{when}", None) and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )
    if failed:
        where = artifacts_dir()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i, (_, page) in enumerate(contexts):
            path = where / f"{request.node.name}-{stamp}-{i}.png"
            try:
                await page.screenshot(path=str(path), full_page=True, timeout=10_000)
                print(f"\nscreenshot of the failed page {page.url}: {path}")
            except Exception as exc:
                print(f"\nno screenshot of {page.url}: {exc}")
        if errors:
            print("page errors:\n" + "\n".join(errors))
    for context, _ in contexts:
        await context.close()
    assert not errors, f"the page threw: {errors}"
