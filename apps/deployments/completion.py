"""An autocomplete deployment's warm-up: the fleet's greedy completions against known ones.

The samples are the version's evaluation's (:func:`warmup_samples`: held-out reply
prefixes of the tenant's own golden corpora, each with the greedy completion the
evaluation computed from the same artifact). Where no evaluation kept any (a version
evaluated before samples were kept), the reference is computed here from the version's own
artifact, once per artifact and process (:func:`artifact_reference`): the evaluation's
held-out prefixes (``worker.autocomplete_eval.held_out``) of the replies it was trained on,
completed in-process by the same Completer a replica builds. A
completion the fleet answers differently, in either case, is a mismatch and fails the
warm-up: the bytes, the tokenizer, the stop rules or the replica's batching and caching
went wrong somewhere between the evaluation and the fleet.

Each sample is sent alone, as a customer's call would be (no session: its cache must not
help), and timed per generated token: an autocomplete policy's latency budget is per token
(``apps.evaluation.services.latency_budget_metric``), and so are the warm-up's latencies.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from apps.core.artifacts import get_store
from apps.deployments.models import Deployment
from apps.evaluation.models import EvalStatus, Evaluation
from apps.registry.models import ModelVersion
from worker import autocomplete_text
from worker.serving.specs import ModelLoadError

KIND = "autocomplete"
# Replies of the training corpus the in-process reference completes, when it is needed.
REFERENCE_REPLIES = 8

_references: dict[str, list[dict[str, Any]]] = {}
_references_lock = threading.Lock()


def warmup_samples(version: ModelVersion, limit: int) -> list[dict[str, Any]]:
    """``[{"prefix", "context", "completion", "max_tokens"}]``: the held-out prefixes and
    greedy completions the version's latest evaluation on one of the tenant's own corpora
    recorded (never a shared set's: a warm-up's mismatches show their text to the tenant);
    [] where none kept any."""
    evaluations = Evaluation.objects.filter(
        model_version=version,
        status=EvalStatus.SUCCEEDED,
        artifact_sha256=version.sha256,
        dataset_version__dataset__tenant_id=version.registered_model.tenant_id,
    ).order_by("-finished_at")
    for evaluation in evaluations[:5]:
        found = [
            {
                "prefix": str(s["prefix"]),
                "context": str(s.get("context") or ""),
                "completion": str(s["completion"]),
                "max_tokens": int(s.get("max_tokens") or autocomplete_text.MAX_TOKENS_DEFAULT),
            }
            for s in (evaluation.samples or [])
            if isinstance(s, dict) and str(s.get("prefix") or "").strip() and "completion" in s
        ]
        if found:
            return found[:limit]
    return []


def artifact_reference(version: ModelVersion, limit: int) -> list[dict[str, Any]]:
    """Samples as :func:`warmup_samples` gives them, computed from the version's own
    artifact (sha256-checked) on the first replies of its training corpus; cached per
    version and artifact in this process (a re-warm costs no model load)."""
    key = f"{version.pk}/{version.sha256}"
    with _references_lock:
        cached = _references.get(key)
    if cached is not None:
        return cached[:limit]
    from worker.autocomplete_eval import held_out
    from worker.serving.autocomplete import AutocompleteModel
    from worker.serving.loading import load_model

    store = get_store()
    loaded = load_model(store.uri(version.artifact_key), version.sha256, device="cpu")
    model = loaded.classifier
    if not isinstance(model, AutocompleteModel):
        raise ModelLoadError(f"{version} is not an autocomplete model")
    samples = []
    for reply in _training_replies(version):
        cut = held_out(reply.text)  # the evaluation's held-out prefix of a reply
        if cut is None:
            continue
        prefix = cut[0]
        (completion,) = model.completer.complete(
            prefix, reply.context, max_tokens=autocomplete_text.MAX_TOKENS_DEFAULT
        )
        samples.append(
            {
                "prefix": prefix,
                "context": reply.context,
                "completion": completion.text,
                "max_tokens": autocomplete_text.MAX_TOKENS_DEFAULT,
            }
        )
        if len(samples) >= REFERENCE_REPLIES:
            break
    with _references_lock:
        _references[key] = samples
    return samples[:limit]


def _training_replies(version: ModelVersion) -> list[Any]:
    from worker.reply_data import read_reply_file

    data = version.run.dataset_version if version.run_id else None
    if data is None:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"replies.{data.format}"
        with get_store().open(data.storage_key) as source, path.open("wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
        return read_reply_file(
            path, data.format, text_column=data.text_column, context_column=data.label_column
        )


def warmup_checks(
    deployment: Deployment,
    backend: Any,
    latencies: list[float],
    mismatches: list[dict[str, Any]],
    *,
    limit: int,
) -> list[dict[str, Any]]:
    """Each sample's prefix completed greedily through the fleet, one at a time, its text
    equal to the sample's completion; fills ``latencies`` and ``mismatches`` and returns
    the samples checked (see the module docstring)."""
    if not hasattr(backend, "complete"):
        raise ModelLoadError("this serving backend does not serve autocomplete models")
    version = deployment.model_version
    samples = warmup_samples(version, limit) or artifact_reference(version, limit)
    if not samples:
        raise ModelLoadError("no recorded completions to warm up with")
    for sample in samples:
        started = time.perf_counter()
        reply = backend.complete(
            KIND,
            version.pk,
            prefix=sample["prefix"],
            context=sample["context"],
            max_tokens=sample["max_tokens"],
        )
        elapsed_ms = (time.perf_counter() - started) * 1000
        first = reply["completions"][0] if reply.get("completions") else {}
        latencies.append(elapsed_ms / max(1, int(first.get("tokens") or 1)))
        got = first.get("text")
        if got != sample["completion"]:
            mismatches.append(
                {
                    "text": sample["prefix"][-200:],
                    "check": "complete",
                    "expected": sample["completion"],
                    "got": got,
                }
            )
    return samples
