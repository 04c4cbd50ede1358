"""Headless Chromium for the dashboard's benchmark, browser tests and screenshots: where the
system browser is (Debian's ``chromium``; Playwright drives it, nothing is downloaded), and the
flags it needs here: no sandbox as root, and no background connections (on a closed network
Chromium's own connections fail, many at a time, at every start)."""

from __future__ import annotations

import shutil

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
MISSING = "no Chromium on PATH (Debian: apt-get install chromium)"


def chromium_path() -> str | None:
    """The system Chromium's executable, or None."""
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
