"""Headless Chromium for the dashboard tests and `make screenshots`: Debian's `chromium`, driven by
Playwright for Python (which never downloads a browser here). No browser is a failure that says
how to install one, never a skip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Where a failing test's screenshots go (and the path it prints): PIPELINES_TEST_ARTIFACTS, else
# a directory under the system's temporary directory.
ARTIFACTS_ENV = "PIPELINES_TEST_ARTIFACTS"
CHROMIUM_ENV = "PIPELINES_CHROMIUM"
INSTALL_HINT = (
    "the dashboard tests need Debian's chromium: `apt-get install -y chromium` "
    f"(or set {CHROMIUM_ENV} to a Chromium executable)"
)


class NoChromium(RuntimeError):
    pass


def chromium_path() -> str:
    """The Chromium executable, or NoChromium saying how to get one."""
    for candidate in (os.environ.get(CHROMIUM_ENV), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NoChromium(INSTALL_HINT)


# --no-sandbox: the tests run as root in CI, where Chromium's own sandbox refuses to start.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage"]
