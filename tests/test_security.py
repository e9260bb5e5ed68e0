"""Auth hygiene (OWASP ASVS level 2): login lockout, security headers on every page,
cookie flags, password rules, and the settings that drive them."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from tests.conftest import PASSWORD, Actor
from tests.test_settings import assert_refused, last_line, manage

ROOT = Path(__file__).resolve().parents[1]


def settings_printed(tmp_path: Path, expression: str, **env: str) -> str:
    """What ``expression`` (over ``s``, the settings) prints in a fresh process with ``env``."""
    code = f"from django.conf import settings as s; print({expression})"
    result = manage(tmp_path, ["shell", "-c", code], **env)
    assert result.returncode == 0, result.stderr
    return last_line(result.stdout)


def login(client: Client, username: str, password: str, **extra: Any) -> Any:
    return client.post("/login/", {"username": username, "password": password}, **extra)


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


# --- lockout -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_after_five_failures_the_username_is_locked_out_from_that_address(
    scientist: Actor,
) -> None:
    browser = Client()
    for _ in range(4):
        failed = login(browser, "sam", "wrong-password")
        assert failed.status_code == 200
        assert "Sign in" in failed.content.decode()
    locked = login(browser, "sam", "wrong-password")
    assert locked.status_code == 429
    page = locked.content.decode()
    assert "Sign-in locked" in page
    assert "Try again in 15 minutes" in page
    assert 14 * 60 < int(locked["Retry-After"]) <= 15 * 60
    # The right password does not get in while locked.
    again = login(browser, "sam", PASSWORD)
    assert again.status_code == 429
    assert not signed_in(browser)
    # Another address, or another username from this one, is not locked.
    elsewhere = Client(REMOTE_ADDR="10.0.0.9")
    assert login(elsewhere, "sam", PASSWORD).status_code == 302
    assert signed_in(elsewhere)
    assert login(Client(), "vic", "wrong-password").status_code == 200


@pytest.mark.django_db
def test_a_sign_in_from_code_without_a_request_still_works(scientist: Actor) -> None:
    # Django's test client (and any code calling authenticate() bare) has no request: axes'
    # own backend raises on it; nothing is counted, the model backend decides.
    assert Client().login(username="sam", password=PASSWORD)
    assert not Client().login(username="sam", password="wrong-password")
    assert not AccessAttempt.objects.exists()


@pytest.mark.django_db
def test_the_lockout_ends_after_the_cool_off(scientist: Actor) -> None:
    browser = Client()
    for _ in range(5):
        login(browser, "sam", "wrong-password")
    assert login(browser, "sam", PASSWORD).status_code == 429
    # As if the cool-off had passed since the last attempt.
    AccessAttempt.objects.filter(username="sam").update(
        attempt_time=timezone.now() - timedelta(minutes=16)
    )
    assert login(browser, "sam", PASSWORD).status_code == 302
    assert signed_in(browser)


@pytest.mark.django_db
def test_a_successful_login_resets_the_failure_count(scientist: Actor) -> None:
    browser = Client()
    for _ in range(4):
        login(browser, "sam", "wrong-password")
    assert login(browser, "sam", PASSWORD).status_code == 302
    browser.logout()
    for _ in range(4):
        assert login(browser, "sam", "wrong-password").status_code == 200
    assert login(browser, "sam", PASSWORD).status_code == 302


@pytest.mark.django_db
def test_behind_a_proxy_the_address_it_saw_counts_not_what_the_client_claims(
    settings: Any, scientist: Actor
) -> None:
    settings.LOGIN_PROXY_COUNT = 1
    proxy = {"REMOTE_ADDR": "10.0.0.2"}
    for _ in range(5):
        login(Client(), "sam", "wrong-password", HTTP_X_FORWARDED_FOR="203.0.113.7", **proxy)
    # A forged entry to the left of what the proxy appended changes nothing.
    forged = "198.51.100.1, 203.0.113.7"
    assert login(Client(), "sam", PASSWORD, HTTP_X_FORWARDED_FOR=forged, **proxy).status_code == 429
    # Another client behind the same proxy is not locked out.
    other = login(Client(), "sam", PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.8", **proxy)
    assert other.status_code == 302


# --- headers and cookies --------------------------------------------------------------------


def csp_directives(response: Any) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    parts = [p.strip().split() for p in header.split(";") if p.strip()]
    return {p[0]: p[1:] for p in parts}


@pytest.mark.django_db
def test_every_kind_of_page_carries_the_security_headers(scientist: Actor) -> None:
    browser = Client()
    browser.force_login(scientist.user)
    pages = {
        "login": Client().get("/login/"),
        "dashboard": browser.get("/t/acme/datasets/"),
        "not found": browser.get("/t/acme/nowhere/"),
        "api": scientist.api("get", "/api/v1/tenants/acme/datasets/"),
        "api error": Client().get("/api/v1/tenants/acme/datasets/"),
        "docs": Client().get("/api/v1/docs/"),
        "docs script": Client().get("/api/v1/docs/?script="),
    }
    for name, response in pages.items():
        assert response["X-Content-Type-Options"] == "nosniff", name
        assert response["Referrer-Policy"] == "same-origin", name
        assert response["X-Frame-Options"] == "DENY", name
        assert response["Cross-Origin-Opener-Policy"] == "same-origin", name
        policy = csp_directives(response)
        assert policy["frame-ancestors"] == ["'none'"], name
        assert policy["default-src"] == ["'self'"], name
        assert policy["object-src"] == ["'none'"], name
        for directive in ("script-src", "style-src"):
            assert "'unsafe-inline'" not in policy[directive], name
            assert "'unsafe-eval'" not in policy[directive], name
    # Over plain HTTP (development) no HSTS: browsers would pin a site that has no TLS.
    assert "Strict-Transport-Security" not in pages["dashboard"]


@pytest.mark.django_db
def test_the_docs_page_has_no_inline_script_or_style() -> None:
    page = Client().get("/api/v1/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), html
    assert "<style" not in html
    script = Client().get("/api/v1/docs/?script=")
    assert script["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle" in script.content.decode()


def test_no_template_has_an_inline_script_style_or_handler_without_a_nonce() -> None:
    """The policy refuses inline code without the request's nonce: a template that adds
    some would break its page in the browser, silently for the user."""
    found = []
    for template in sorted((ROOT / "templates").rglob("*.html")):
        text = template.read_text()
        for tag in re.findall(r"<(?:script|style)\b[^>]*>", text):
            if "src=" not in tag and "csp_nonce" not in tag:
                found.append(f"{template.name}: {tag}")
        found += [f"{template.name}: {m}" for m in re.findall(r"\s(?:on\w+|style)=", text)]
        found += [f"{template.name}: javascript: URL" for _ in re.findall("javascript:", text)]
    assert found == []


@pytest.mark.django_db
def test_session_and_csrf_cookies_are_httponly_and_samesite(scientist: Actor) -> None:
    browser = Client(enforce_csrf_checks=True)
    form = browser.get("/login/")
    csrf = form.cookies["csrftoken"]
    assert csrf["samesite"] == "Lax"
    response = browser.post(
        "/login/",
        {"username": "sam", "password": PASSWORD, "csrfmiddlewaretoken": csrf.value},
    )
    assert response.status_code == 302
    session = response.cookies["sessionid"]
    assert session["httponly"] is True
    assert session["samesite"] == "Lax"
    assert not session["secure"]  # development, plain HTTP; see the HTTPS case below


def test_over_https_cookies_are_secure_and_hsts_is_on(tmp_path: Path) -> None:
    printed = settings_printed(
        tmp_path,
        "s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, "
        "s.SESSION_COOKIE_HTTPONLY",
        WORKBENCH_HTTPS="true",
    )
    assert printed == "True True 31536000 True"


# --- passwords --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_passwords_are_checked_against_djangos_validators(scientist: Actor) -> None:
    validate_password(PASSWORD, user=scientist.user)
    for weak, reason in (
        ("Tr0ub4dor&3", "at least 12 characters"),
        ("804512379146", "entirely numeric"),
        ("sam@example.com", "too similar"),
        ("password1234", "too common"),
    ):
        with pytest.raises(ValidationError) as refused:
            validate_password(weak, user=scientist.user)
        assert reason in " ".join(refused.value.messages), weak


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"API_THROTTLE_RATE": "lots"}, "API_THROTTLE_RATE"),
        ({"API_THROTTLE_RATE": "0/minute"}, "API_THROTTLE_RATE"),
        ({"CACHE_URL": "memcached://cache:11211"}, "CACHE_URL"),
        ({"LOGIN_FAILURE_LIMIT": "0"}, "LOGIN_FAILURE_LIMIT"),
        ({"LOGIN_LOCKOUT_MINUTES": "soon"}, "LOGIN_LOCKOUT_MINUTES"),
        ({"PASSWORD_MIN_LENGTH": "6"}, "PASSWORD_MIN_LENGTH"),
    ],
)
def test_bad_security_settings_are_refused(
    tmp_path: Path, env: dict[str, str], problem: str
) -> None:
    assert_refused(manage(tmp_path, ["check"], **env), problem)


def test_security_settings_from_the_environment_are_used(tmp_path: Path) -> None:
    printed = settings_printed(
        tmp_path,
        "s.API_THROTTLE_RATE, s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME.total_seconds(), "
        "*s.CONTENT_SECURITY_POLICY['DIRECTIVES']['report-uri']",
        API_THROTTLE_RATE="100/second",
        LOGIN_FAILURE_LIMIT="3",
        LOGIN_LOCKOUT_MINUTES="30",
        CSP_REPORT_URI="https://reports.example.com/csp",
    )
    assert printed == "100/second 3 1800.0 https://reports.example.com/csp"
