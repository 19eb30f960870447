"""`make screenshots`: the dashboard's pages as PNGs for the README (docs/screenshots/), taken in
headless Chromium against a live stack with a little demo data; prints each page's load time.

    python -m tests.dashboard.screenshots docs/screenshots
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Page, async_playwright

from tests import servers
from tests.dashboard.browser import LAUNCH_ARGS, chromium_path
from tests.dashboard.stack import LiveStack, live_stack

SPEC = r"""
name: build-and-ship
description: Builds for two architectures, tests, waits for a human, ships.
variables: {VERSION: "1.4.2"}
stages:
  - id: build
    jobs:
      - name: image
        matrix: {arch: [amd64, arm64]}
        steps:
          - name: build
            run: |
              for i in 1 2 3; do
                printf '\033[36m[%s]\033[0m layer %s \033[32mok\033[0m\n' "$MATRIX_ARCH" "$i"
              done
      - name: unit
        needs: [image]
        steps:
          - name: test
            run: |
              printf '\033[1m42 passed\033[0m in 0.8s\n'
      - name: lint
        needs: [image]
        steps:
          - name: check
            run: |
              printf 'ruff: \033[32mAll checks passed!\033[0m\n'
  - id: release
    jobs:
      - name: ship
        steps:
          - {name: approve, approval: {message: "Ship it to production?"}}
          - {name: deploy, run: "echo shipped $VERSION"}
"""


async def _json(stack: LiveStack, method: str, path: str, body: Any = None, role: str = "admin") -> Any:
    r = await stack.system.client.request(method, path, json=body, headers=stack.system.headers(role, sub="carol"))
    assert r.status_code < 300, r.text
    return r.json()


async def seed(stack: LiveStack) -> dict[str, str]:
    """A pipeline with runs in several states, and deployments."""
    import yaml

    doc = yaml.safe_load(SPEC)
    name, description = doc.pop("name"), doc.pop("description")
    pipeline = await _json(stack, "POST", "/api/v1/pipelines", {"name": name, "description": description})
    await _json(stack, "POST", f"/api/v1/pipelines/{pipeline['id']}/spec/save", {"spec": doc, "format": "yaml"})
    doc["variables"]["VERSION"] = "1.5.0"
    await _json(
        stack,
        "POST",
        f"/api/v1/pipelines/{pipeline['id']}/spec/save",
        {"spec": doc, "format": "yaml", "commitMessage": "ship 1.5.0"},
    )
    component = await _json(stack, "POST", "/api/v1/components", {"name": "checkout-api"})
    envs = [
        await _json(
            stack, "POST", "/api/v1/environments", {"name": n, "deployer": {"type": "command", "command": "true"}}
        )
        for n in ("staging", "production")
    ]
    for env, version in ((envs[0], "1.5.0"), (envs[1], "1.4.2")):
        deployer = await stack.system.create_pipeline(
            [
                {
                    "id": "ship",
                    "name": "Ship",
                    "type": "deploy",
                    "config": {"componentId": component["id"], "environmentId": env["id"]},
                }
            ],
            name=f"deploy-{env['name']}",
        )
        run = await stack.system.trigger(deployer["id"], variables={"VERSION": version})
        await stack.system.wait_status(deployer["id"], run["id"], "succeeded", timeout=60)
    pid = pipeline["id"]
    done = await _json(stack, "POST", f"/api/v1/pipelines/{pid}/trigger", {})
    await stack.system.wait_status(pid, done["id"], "waiting_approval", timeout=60)
    await _json(stack, "POST", f"/api/v1/pipelines/{pid}/runs/{done['id']}/approve", {"comment": "looks good"})
    await stack.system.wait_status(pid, done["id"], "succeeded", timeout=60)
    failed = await stack.system.create_pipeline(
        [{"id": "test", "name": "Tests", "type": "script", "config": {"command": "echo 1 failed; exit 1"}}],
        name="nightly-integration",
    )
    bad = await stack.system.trigger(failed["id"])
    await stack.system.wait_status(failed["id"], bad["id"], "failed", timeout=60)
    waiting = await _json(stack, "POST", f"/api/v1/pipelines/{pid}/trigger", {"variables": {"VERSION": "1.5.0"}})
    await stack.system.wait_status(pid, waiting["id"], "waiting_approval", timeout=60)
    return {"pipeline": pid, "waiting": waiting["id"]}


async def shoot(
    page: Page, stack: LiveStack, path: str, out: Path, *, full: bool = False, click: str | None = None
) -> float:
    started = time.monotonic()
    await page.goto(stack.api_url + path)
    await page.wait_for_selector("body[data-ready]")
    took = time.monotonic() - started
    if click is not None:
        await page.get_by_role("button", name=click).click()
    await page.wait_for_timeout(400)  # live status and late rows settle
    await page.screenshot(path=str(out), full_page=full)
    return took


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    executable = chromium_path()
    with servers.session_database() as database_url, servers.nats_server() as nats_url:
        async with live_stack(database_url, nats_url, Path(tempfile.mkdtemp(prefix="pipelines-shots-"))) as stack:
            ids = await seed(stack)
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
                context = await browser.new_context(viewport={"width": 1280, "height": 860})
                page = await context.new_page()
                await page.goto(f"{stack.api_url}/signin")
                await page.wait_for_selector("#token")
                await page.screenshot(path=str(out / "signin.png"))
                await page.goto(f"{stack.api_url}/?token={stack.token('admin', sub='carol')}")
                await page.wait_for_selector("body[data-ready]")
                times = {
                    "pipelines": await shoot(page, stack, "/", out / "pipelines.png"),
                    "pipeline": await shoot(
                        page, stack, f"/pipelines/{ids['pipeline']}", out / "pipeline.png", full=True
                    ),
                    "run": await shoot(page, stack, f"/runs/{ids['waiting']}", out / "run.png"),
                    "runs": await shoot(page, stack, "/runs", out / "runs.png"),
                    "deployments": await shoot(page, stack, "/deployments", out / "deployments.png"),
                }
                await context.close()
                await browser.close()
    for name, took in times.items():
        print(f"{name:12} loaded in {took * 1000:5.0f} ms")
    print(f"screenshots in {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots")))
