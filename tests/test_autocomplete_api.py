"""Autocomplete deployments where no fleet is involved: the complete door's validation (400s
naming the field, nothing sent to the fleet), tenancy (404) and state errors (409); what
it answers from the data plane; the deployment page's completion box and its JSON
endpoint; the SDK; and the warm-up's check of greedy completions against the evaluation's
samples (or the artifact's own, computed in-process, where it kept none) through a backend
answering in-process with the tiny model — a mismatch fails it, visibly. The replica path
on a real Ray is in test_autocomplete_fleet.py."""

from __future__ import annotations

from typing import Any

import pytest

from apps.deployments import services
from apps.deployments.models import FleetAlert
from apps.registry.models import ModelVersion
from tests.autocomplete_helpers import (
    REPLIES,
    PackedCompleter,
    record_evaluation,
    register_autocomplete,
    reply_version,
)
from tests.test_deployments_api import deploy, make_version
from worker import autocomplete_text as limits

API = "/api/v1/tenants/acme"
URL = f"{API}/models/replies/complete"

pytestmark = pytest.mark.django_db


@pytest.fixture
def packed(autocomplete_packed: PackedCompleter) -> PackedCompleter:
    return autocomplete_packed


@pytest.fixture
def autocomplete_version(tenant, artifacts_dir) -> ModelVersion:
    return register_autocomplete(tenant, "replies", None, reply_version(tenant))


class FakePlane:
    """A data plane answering complete with a fixed completion, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def complete(self, kind: str, model_id: str, **request: Any) -> dict[str, Any]:
        self.calls.append((kind, model_id, request))
        answer = {"text": " should I check for you?", "score": -0.25, "tokens": 6}
        completions = [answer] * request["n"]
        return {"completions": completions, "cached_tokens": 3 if request["session"] else 0}


@pytest.fixture
def plane(monkeypatch) -> FakePlane:
    fake = FakePlane()
    monkeypatch.setattr("apps.deployments.fleet.data_plane", lambda: fake)
    return fake


def test_complete_of_another_tenants_model_is_404(autocomplete_version, outsider):
    deploy(autocomplete_version, "warm")
    body = {"prefix": "Which account"}
    assert outsider.api("post", URL, body).status_code == 404
    own = outsider.api("post", "/api/v1/tenants/globex/models/replies/complete", body)
    assert own.status_code == 404


def test_complete_without_a_warm_deployment_is_409_naming_the_status(autocomplete_version, viewer):
    none_yet = viewer.api("post", URL, {"prefix": "Which account"})
    assert none_yet.status_code == 409
    assert none_yet.json()["error"]["code"] == "not_warm"
    assert none_yet.json()["error"]["status"] == "not_deployed"
    deploy(autocomplete_version, "loading")
    loading = viewer.api("post", URL, {"prefix": "Which account"})
    assert loading.status_code == 409 and loading.json()["error"]["status"] == "loading"


def test_complete_needs_an_autocomplete_model_and_it_answers_nothing_else(
    autocomplete_version, scientist, tenant, viewer, plane
):
    deploy(make_version(scientist, tenant), "warm")
    deploy(autocomplete_version, "warm")
    refused = viewer.api("post", f"{API}/models/intents/complete", {"prefix": "Which account"})
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "not_autocomplete"
    predict = viewer.api("post", f"{API}/models/replies/predict", {"inputs": ["hi"]})
    assert predict.status_code == 409 and predict.json()["error"]["code"] == "not_a_classifier"
    search = viewer.api("post", f"{API}/models/replies/search", {"query": "hi"})
    assert search.status_code == 409 and search.json()["error"]["code"] == "not_embedding"
    assert plane.calls == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"prefix": "   \n"}, "prefix"),
        ({"prefix": "x" * (limits.PREFIX_MAX_CHARS + 1)}, "prefix"),
        ({"prefix": "ok", "context": "x" * (limits.CONTEXT_MAX_CHARS + 1)}, "context"),
        ({"prefix": "ok", "max_tokens": 0}, "max_tokens"),
        ({"prefix": "ok", "max_tokens": limits.MAX_TOKENS_LIMIT + 1}, "max_tokens"),
        ({"prefix": "ok", "max_tokens": "many"}, "max_tokens"),
        ({"prefix": "ok", "n": 0}, "n"),
        ({"prefix": "ok", "n": limits.N_LIMIT + 1}, "n"),
        ({"prefix": "ok", "strategy": "nucleus"}, "strategy"),
        ({"prefix": "ok", "strategy": "top_k", "top_k": 0}, "top_k"),
        ({"prefix": "ok", "strategy": "top_k", "top_k": 51}, "top_k"),
        ({"prefix": "ok", "seed": -1}, "seed"),
        ({"prefix": "ok", "session": "s" * 65}, "session"),
        ({"prefix": "ok", "environment": "prod"}, "environment"),
    ],
)
def test_complete_refuses_bad_input_naming_the_field_and_sends_nothing(
    autocomplete_version, viewer, plane, body, field
):
    deploy(autocomplete_version, "warm")
    response = viewer.api("post", URL, body)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert plane.calls == []


def test_complete_answers_what_the_fleet_serves(autocomplete_version, viewer, plane):
    deploy(autocomplete_version, "warm")
    response = viewer.api(
        "post", URL, {"prefix": "Which account", "context": "What is my balance?"}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["model"] == "replies" and body["version"] == 1
    assert body["model_version"] == autocomplete_version.pk
    assert body["completions"] == [
        {"text": " should I check for you?", "score": -0.25, "tokens": 6}
    ]
    assert body["cached_tokens"] == 0 and body["latency_ms"] >= 0
    beam = viewer.api("post", URL, {"prefix": "Which", "n": 3, "strategy": "beam",
                                    "max_tokens": 4, "session": "agent-7"})  # fmt: skip
    assert beam.status_code == 200, beam.content
    assert len(beam.json()["completions"]) == 3 and beam.json()["cached_tokens"] == 3
    # The prefix is sent as typed (a trailing space is a word boundary: it matters).
    spaced = viewer.api("post", URL, {"prefix": "Which "})
    assert spaced.status_code == 200
    assert plane.calls == [
        ("autocomplete", autocomplete_version.pk,
         {"prefix": "Which account", "context": "What is my balance?", "max_tokens": 16,
          "n": 1, "strategy": "greedy", "top_k": 5, "seed": 0, "session": ""}),
        ("autocomplete", autocomplete_version.pk,
         {"prefix": "Which", "context": "", "max_tokens": 4, "n": 3, "strategy": "beam",
          "top_k": 5, "seed": 0, "session": "agent-7"}),
        ("autocomplete", autocomplete_version.pk,
         {"prefix": "Which ", "context": "", "max_tokens": 16, "n": 1, "strategy": "greedy",
          "top_k": 5, "seed": 0, "session": ""}),
    ]  # fmt: skip


def test_the_deployment_page_of_an_autocomplete_model_suggests_as_you_type(
    autocomplete_version, viewer, outsider, scientist, tenant, plane
):
    from django.test import Client

    warm = deploy(autocomplete_version, "warm")
    client = Client()
    client.force_login(viewer.user)
    page = client.get(f"/t/acme/deployments/{warm.pk}/").content.decode()
    assert 'id="complete-form"' in page and "js/autocomplete.js" in page
    assert 'id="complete-suggestion"></strong>' in page  # nothing asked yet
    # The box's JSON endpoint: the API's answer, the page's session passed on.
    url = f"/t/acme/deployments/{warm.pk}/complete/"
    answer = client.post(url, {"prefix": "Which account", "session": "page-1"})
    assert answer.status_code == 200, answer.content
    assert answer.json()["completions"][0]["text"] == " should I check for you?"
    assert answer.json()["cached_tokens"] == 3
    assert plane.calls[-1][2]["session"] == "page-1"
    assert plane.calls[-1][2]["max_tokens"] == 8
    empty = client.post(url, {"prefix": " "})
    assert empty.status_code == 400 and "prefix" in empty.json()["error"]["fields"]
    # Without script: ?prefix= renders the completion on the page.
    page = client.get(f"/t/acme/deployments/{warm.pk}/?prefix=Which+account").content.decode()
    assert 'id="complete-suggestion"> should I check for you?</strong>' in page
    # Another tenant's member, and the signed-out, get nothing.
    stranger = Client()
    stranger.force_login(outsider.user)
    assert stranger.post(url, {"prefix": "Which"}).status_code == 404
    assert Client().post(url, {"prefix": "Which"}).status_code == 302  # to the login page
    assert len(plane.calls) == 2
    # A classifier's page has no box, and its endpoint says why.
    other = deploy(make_version(scientist, tenant), "warm")
    assert 'id="complete"' not in client.get(f"/t/acme/deployments/{other.pk}/").content.decode()
    refused = client.post(f"/t/acme/deployments/{other.pk}/complete/", {"prefix": "Which"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_autocomplete"


def test_the_notebook_client_completes(live_server, autocomplete_version, viewer, plane):
    from workbench.client import Workbench, WorkbenchError

    deploy(autocomplete_version, "warm")
    wb = Workbench(live_server.url, viewer.token, "acme")
    answer = wb.complete("replies", "Which account", context="What is my balance?",
                         max_tokens=8, session="s1")  # fmt: skip
    assert answer["completions"][0]["text"] == " should I check for you?"
    assert answer["cached_tokens"] == 3
    assert plane.calls[0][2]["session"] == "s1" and plane.calls[0][2]["max_tokens"] == 8
    with pytest.raises(WorkbenchError) as refused:
        wb.complete("replies", "Which", max_tokens=0)
    assert refused.value.status == 400
    with pytest.raises(WorkbenchError) as missing:
        wb.complete("no-such-model", "Which")
    assert missing.value.status == 404


class InProcessBackend:
    """Answers complete as a replica would, from the version's own artifact (loaded by the
    replica's loader); ``tamper`` changes the completions."""

    def __init__(self, packed: PackedCompleter) -> None:
        from worker.serving.autocomplete import completion_request
        from worker.serving.loading import load_model

        loaded = load_model(packed.tar.as_uri(), packed.sha256, device="cpu")
        self.model = loaded.classifier
        self.check = completion_request
        self.tamper = False
        self.calls = 0

    def complete(self, kind: str, model_id: str, **request: Any) -> dict[str, Any]:
        self.calls += 1
        answer = self.model.complete(self.check(request))  # type: ignore[union-attr]
        if self.tamper:
            answer["completions"][0]["text"] += " thanks"
        return answer


def test_the_warmup_checks_greedy_completions_against_the_evaluations(
    packed, tenant, settings, artifacts_dir
):
    from tests.autocomplete_helpers import completer_of

    settings.DEPLOYMENT_WARMUP_SAMPLES = 3
    version = register_autocomplete(tenant, "replies", packed, reply_version(tenant))
    deployment = deploy(version, "loading")
    backend = InProcessBackend(packed)
    # No evaluation kept samples: the artifact's own completions, computed in-process from
    # the replies it was trained on, are the reference.
    fallback = services.warmup_run(deployment=deployment, trigger="deploy", backend=backend)
    assert fallback.ok, fallback.error
    assert fallback.samples == 3 and backend.calls == 3
    backend.tamper = True
    bad = services.warmup_run(deployment=deployment, trigger="manual", backend=backend)
    assert not bad.ok and "differ from the evaluation's" in bad.error
    assert {m["check"] for m in bad.mismatches} == {"complete"}
    assert bad.mismatches[0]["got"].endswith(" thanks")

    # The evaluation's samples, when it kept them, are what the fleet must answer.
    model = completer_of(packed.model_dir)
    samples = []
    for context, reply in REPLIES[:4]:
        prefix = " ".join(reply.split()[:2])
        (greedy,) = model.complete(prefix, context)
        samples.append({"prefix": prefix, "context": context, "completion": greedy.text,
                        "reference": reply[len(prefix):], "matched": True})  # fmt: skip
    evaluation = record_evaluation(version, samples)
    backend.tamper = False
    good = services.warmup_run(deployment=deployment, trigger="manual", backend=backend)
    assert good.ok, good.error
    assert good.samples == 3  # DEPLOYMENT_WARMUP_SAMPLES of the evaluation's four
    assert not FleetAlert.objects.filter(deployment=deployment, resolved_at=None).exists()
    # A recorded completion the fleet does not give: the warm-up fails and says which.
    evaluation.samples = [{**samples[0], "completion": " something else entirely."}]
    evaluation.save()
    mismatch = services.warmup_run(deployment=deployment, trigger="manual", backend=backend)
    assert not mismatch.ok
    (found,) = mismatch.mismatches
    assert found["text"] == samples[0]["prefix"]
    assert found["expected"] == " something else entirely."
    assert found["got"] == samples[0]["completion"]
    alert = FleetAlert.objects.get(deployment=deployment, kind="warmup_failed", resolved_at=None)
    assert "Warm-up of replies v1" in alert.message and "differ" in alert.message


def test_a_warmup_with_nothing_to_compare_fails_naming_why(
    autocomplete_version, tenant, settings, packed
):
    deployment = deploy(autocomplete_version, "loading")
    # One-word replies only: the artifact's reference has no prefix to complete.
    terse_data = reply_version(tenant, "terse", [("", "Sure"), ("Hi", "Hello")])
    version = register_autocomplete(tenant, "terse", packed, terse_data)
    terse = deploy(version, "loading")
    backend = InProcessBackend(packed)
    failed = services.warmup_run(deployment=terse, trigger="deploy", backend=backend)
    assert not failed.ok and "no recorded completions to warm up with" in failed.error
    # A backend that cannot complete at all.
    refused = services.warmup_run(deployment=deployment, trigger="deploy", backend=object())  # type: ignore[arg-type]
    assert not refused.ok and "does not serve autocomplete models" in refused.error
