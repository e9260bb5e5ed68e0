"""Every route of the URL conf, walked the way drf-spectacular's endpoint enumerator does,
so tests that must hold for every view (isolation, permissions) see routes added later."""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, URLResolver, get_resolver


def url_routes(prefix: str = "") -> list[tuple[str, Any]]:
    """``(route, callback)`` for every URL pattern whose route starts with ``prefix``."""
    found: list[tuple[str, Any]] = []

    def walk(patterns: list[Any], above: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, above + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                route = above + str(pattern.pattern)
                if route.startswith(prefix):
                    found.append((route, pattern.callback))

    walk(get_resolver().url_patterns, "")
    return found
