"""An autocomplete deployment on a real local Ray Serve fleet (the session's head): approve ->
deployed on the autocomplete pool -> warm-up verified against the evaluation's greedy
completions -> complete through the REST API equal to the version's own Completer
in-process; a session's second call reuses the first one's cache (``cached_tokens`` > 0)
and answers what the prefix alone gets; concurrent completions (batched on the replica)
each answer as alone; the SDK; another tenant's model is 404; a recorded completion the
fleet does not give fails a warm-up.

The fleet controller's passes run in this process (tests/deploy_helpers.settle)."""

from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any

import pytest

from apps.deployments import fleet, services
from apps.deployments.backends import get_backend, reset_backend
from apps.deployments.dataplane import reset_data_plane
from apps.deployments.models import Deployment, ServingPool
from tests.autocomplete_helpers import (
    REPLIES,
    PackedCompleter,
    completer_of,
    record_evaluation,
    register_autocomplete,
    reply_version,
)
from tests.deploy_helpers import approve

pytestmark = [pytest.mark.django_db(transaction=True)]

API = "/api/v1/tenants/acme"
URL = f"{API}/models/replies/complete"
# (prefix, context): word boundaries and mid-word prefixes, with and without a context.
PROMPTS = [
    ("Which account", "What is my balance?"),
    ("The bal", "Check my savings."),
    ("Great. Is there", "Thanks."),
    ("Have a", ""),
    ("Alright, which", "Send it to Bob."),
    ("Your transfer", ""),
]


@pytest.fixture
def packed(autocomplete_packed: PackedCompleter) -> PackedCompleter:
    return autocomplete_packed


@pytest.fixture
def autocomplete_fleet(settings, ray_address, artifacts_dir) -> Any:
    settings.RAY_ADDRESS = ray_address
    settings.RAY_NAMESPACE = f"ac-{uuid.uuid4().hex[:6]}"
    settings.SERVING_BACKEND = "ray"
    settings.DEPLOYMENT_WARMUP_SAMPLES = 4
    reset_backend()
    reset_data_plane()
    yield settings
    for pool in ServingPool.objects.all():  # leave the shared Ray empty
        Deployment.objects.update(status="retired", standby=False)
        fleet.pool_apply(kind=pool.kind, backend=get_backend())
    reset_backend()
    reset_data_plane()


def alone(packed: PackedCompleter, prefix: str, context: str = "", **options: Any) -> Any:
    (completion,) = completer_of(packed.model_dir).complete(prefix, context, **options)
    return completion


def test_an_autocomplete_deployment_completes_as_the_model_does_in_process(
    autocomplete_fleet, packed, tenant, scientist, reviewer, viewer, outsider, live_server
):
    version = register_autocomplete(
        tenant, "replies", packed, reply_version(tenant), trainer=scientist.user
    )
    samples = []
    for context, reply in REPLIES[:4]:
        prefix = " ".join(reply.split()[:2])
        samples.append({"prefix": prefix, "context": context, "max_tokens": 16,
                        "completion": alone(packed, prefix, context).text})  # fmt: skip
    evaluation = record_evaluation(version, samples)
    deployment = approve(scientist, reviewer, version, "production")
    deployment.refresh_from_db()
    assert deployment.status == "warm", deployment.failure
    (warmup,) = deployment.warmups.all()
    assert warmup.ok and warmup.samples == 4 and not warmup.mismatches

    # Through REST: the text and score the version's Completer gives in-process.
    for prefix, context in PROMPTS:
        response = viewer.api("post", URL, {"prefix": prefix, "context": context})
        assert response.status_code == 200, response.content
        body = response.json()
        expected = alone(packed, prefix, context)
        (served,) = body["completions"]
        assert served["text"] == expected.text, prefix
        assert served["score"] == pytest.approx(expected.score, abs=1e-4)
        assert body["cached_tokens"] == 0 and body["model_version"] == version.pk
    beam = viewer.api("post", URL, {"prefix": "Which", "n": 2, "strategy": "beam"}).json()
    expected_beam = completer_of(packed.model_dir).complete("Which", n=2, strategy="beam")
    assert [c["text"] for c in beam["completions"]] == [c.text for c in expected_beam]

    # A session: the second call extends the first and reuses its keys/values, and answers
    # what the longer prefix gets alone.
    session = {"context": "What is my balance?", "session": "agent-42"}
    first = viewer.api("post", URL, {"prefix": "Which acc", **session}).json()
    assert first["cached_tokens"] == 0
    second = viewer.api("post", URL, {"prefix": "Which account should", **session}).json()
    assert second["cached_tokens"] > 0
    expected = alone(packed, "Which account should", "What is my balance?")
    assert second["completions"][0]["text"] == expected.text

    # Concurrent completions (batched on the replica) each answer as alone.
    backend = get_backend()

    def ask(prompt: tuple[str, str]) -> str:
        reply = backend.complete("autocomplete", version.pk, prefix=prompt[0],  # type: ignore[attr-defined]
                                 context=prompt[1])  # fmt: skip
        return str(reply["completions"][0]["text"])

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        answered = list(pool.map(ask, PROMPTS * 2))
    assert answered == [alone(packed, p, c).text for p, c in PROMPTS * 2]

    # The notebook client, through the live server.
    from workbench.client import Workbench

    wb = Workbench(live_server.url, viewer.token, "acme")
    sdk = wb.complete("replies", "The bal", context="Check my savings.", max_tokens=4)
    assert sdk["completions"][0]["text"] == alone(packed, "The bal", "Check my savings.",
                                                  max_tokens=4).text  # fmt: skip

    # The fleet shows the model with its sessions; another tenant's model is not found.
    (pool_status,) = [p for p in viewer.api("get", "/api/v1/fleet/").json()["pools"]
                      if p["kind"] == "autocomplete"]  # fmt: skip
    (model,) = [m for s in pool_status["sets"] for r in s["replicas"] for m in r["models"]]
    assert model["model_id"] == version.pk and model["memory_bytes"] > 0
    assert outsider.api("post", URL, {"prefix": "Which"}).status_code == 404
    theirs = "/api/v1/tenants/globex/models/replies/complete"
    assert outsider.api("post", theirs, {"prefix": "Which"}).status_code == 404

    # A recorded completion the fleet does not give: the warm-up finds it.
    evaluation.samples = [{**samples[0], "completion": " not what it says."}]
    evaluation.save()
    failed = services.warmup_run(deployment=deployment, trigger="manual", backend=backend)
    assert not failed.ok and "differ from the evaluation's" in failed.error
    assert failed.mismatches[0]["got"] == samples[0]["completion"]
