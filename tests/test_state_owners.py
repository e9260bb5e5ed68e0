"""One owner per state machine: a promotion's status is written only by
apps/promotions/services.py (other apps call its verbs), as STYLE.md asks. A source scan,
like the layering test: it failed on the code where deployments wrote `deploying`,
`done` and `failed` themselves."""

from __future__ import annotations

import re
from pathlib import Path

APPS = Path(__file__).resolve().parents[1] / "apps"
OWNER = APPS / "promotions" / "services.py"
WRITES = [
    re.compile(r"PromotionRequest\.objects[^\n]*(?:\n[^\n]*){0,3}?\.update\([^)]*status\s*="),
    re.compile(r"\bpromotion\.status\s*=(?!=)"),
    re.compile(r"PromotionStatus\.(?:DEPLOYING|DONE|FAILED)\b"),
]


def test_only_the_promotions_services_write_a_promotions_status() -> None:
    offenders = []
    for path in sorted(APPS.rglob("*.py")):
        if path == OWNER or "migrations" in path.parts or path.parent.name == "promotions":
            continue
        text = path.read_text()
        for pattern in WRITES:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(APPS.parent)}:{line}: {match.group(0)!r}")
    assert offenders == []


def test_the_scan_sees_the_write_it_forbids() -> None:
    old = "PromotionRequest.objects.filter(pk=p.pk).update(status=PromotionStatus.DEPLOYING)"
    assert any(pattern.search(old) for pattern in WRITES)
