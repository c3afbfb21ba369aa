"""A Chromium for the page tests (tests/test_page.py), without ever stopping `make test` for want of one.

    python tests/chromium.py       (what `make test` runs when there is no /usr/bin/chromium)

When Playwright's own browser is already installed, there is nothing to do. Otherwise it is installed
(`playwright install chromium`) only when Playwright's download host answers; offline nothing is tried
and nothing is said here. When there is still no browser, the page tests skip with one line that says
why; everything else runs. This always exits 0.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.parse

PLAYWRIGHT = [sys.executable, "-m", "playwright"]


def plan() -> tuple[list[str], list[str]]:
    """(install locations, download URLs) of what `playwright install chromium` would fetch."""
    out = subprocess.run(
        [*PLAYWRIGHT, "install", "--dry-run", "chromium"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return re.findall(r"Install location:\s+(\S+)", out), re.findall(r"Download url:\s+(\S+)", out)


def installed(locations: list[str]) -> bool:
    # Playwright writes this marker last, so a half-finished install does not count.
    return bool(locations) and all(os.path.isfile(os.path.join(d, "INSTALLATION_COMPLETE")) for d in locations)


def playwright_has_it() -> bool:
    """Whether Playwright's own Chromium is installed (what test_page.py asks when Debian's is absent)."""
    try:
        return installed(plan()[0])
    except (OSError, subprocess.SubprocessError):
        return False


def reachable(url: str, timeout: float = 5.0) -> bool:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:  # no DNS, no route, refused, timed out: offline as far as this is concerned
        return False


def main() -> int:
    try:
        locations, urls = plan()
    except (OSError, subprocess.SubprocessError) as e:
        print(f"chromium: cannot ask Playwright what it needs ({e}); the page tests will be skipped", file=sys.stderr)
        return 0
    if installed(locations):
        return 0
    if not urls or not reachable(urls[0]):
        return 0  # offline: the page tests skip with one line that says why and what to install
    print("chromium: installing Playwright's Chromium (no /usr/bin/chromium here)", file=sys.stderr)
    try:
        result = subprocess.run([*PLAYWRIGHT, "install", "chromium"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        why = "it took more than 15 minutes"
    else:
        if result.returncode == 0:
            return 0
        lines = (result.stderr + result.stdout).splitlines()
        why = next((line.strip() for line in lines if line.startswith("Error")), lines[-1] if lines else "no output")
    print(f"chromium: `playwright install chromium` failed ({why}); the page tests will be skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
