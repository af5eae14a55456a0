"""Headless Chromium for the web app's tests and screenshots: Playwright for
Python driving Debian's /usr/bin/chromium (executable_path; no browser download),
each browser with a fresh user-data folder and nothing reaching out to the network."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@contextmanager
def browser() -> Iterator[Any]:
    """One headless Chromium; `browser.new_context()` per person. Playwright starts
    it with a fresh user-data folder of its own (a temporary one, removed after)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def sign_in(page: Any, base: str, user: str, password: str, *, keyboard: bool = False) -> None:
    """Sign in on the page, clicking, or (`keyboard`) by keys alone as a person
    without a mouse would: the User field has the focus, Tab, Enter."""
    page.goto(base + "/")
    if keyboard:
        page.get_by_label("User").wait_for()
        page.keyboard.type(user)
        page.keyboard.press("Tab")
        page.keyboard.type(password)
        page.keyboard.press("Enter")
    else:
        page.get_by_label("User").fill(user)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
    page.get_by_role("list", name="Conversations").wait_for(state="attached")
