"""Steps the browser tests share."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import PASSWORD

# Where the login form sends a member of one tenant.
LANDING = "/t/acme/datasets/"
# A desktop window, wide enough for the tables without their scrollbars.
WIDE = {"width": 1280, "height": 900}


@contextmanager
def browser_page(chromium: Any, *, timeout_ms: int = 30_000, **options: Any) -> Iterator[Any]:
    """A page in a browser context of its own (its own cookies; ``options`` as Playwright's
    ``new_context`` takes them), closed afterwards."""
    context = chromium.new_context(**options)
    try:
        page = context.new_page()
        page.set_default_timeout(timeout_ms)
        yield page
    finally:
        context.close()


def sign_in(page: Any, base_url: str, username: str, *, lands: bool = True) -> None:
    """Sign in through the login form; with ``lands``, wait for the tenant's first page."""
    page.goto(f"{base_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("form.stack button[type=submit]")
    if lands:
        page.wait_for_url(re.compile(f"{re.escape(LANDING)}$"))


def open_section(page: Any, section: str) -> None:
    """Follow the navigation bar's link to one of the tenant's pages."""
    page.click(f"nav a[href='/t/acme/{section}/']")
    page.wait_for_url(re.compile(f"/t/acme/{section}/$"))


def watch_csp(page: Any) -> list[str]:
    """Every Content-Security-Policy violation the page meets from now on, across
    navigations: what the browser logs (``Refused to ...``) and what the document reports
    (``securitypolicyviolation``, forwarded by a script Playwright injects past the policy)."""
    seen: list[str] = []
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => console.error("
        "'csp-violation: ' + e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline')"
        " + ' at ' + e.sourceFile + ':' + e.lineNumber + ' on ' + e.documentURI));"
    )

    def record(message: Any) -> None:
        text = str(message.text)
        if "csp-violation" in text or "Content Security Policy" in text:
            seen.append(text)

    page.on("console", record)
    return seen
