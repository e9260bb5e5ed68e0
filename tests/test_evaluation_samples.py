"""Warm-up samples an evaluation keeps: only of the tenant's own sets, since a warm-up's
mismatches show their text to the tenant. The evaluation task runs in this process on a
real tiny model (no Celery worker needed to see what it records)."""

from __future__ import annotations

import csv
import io

import pytest

from apps.datasets.models import DatasetVersion
from apps.evaluation.models import Evaluation
from apps.evaluation.tasks import run_evaluation
from tests.test_deployments_api import SHARED_TEXT, shared_golden_version
from tests.test_evaluation_leases import registered_version
from tests.training_helpers import banking_slice, make_training_version


@pytest.mark.django_db(transaction=True)
def test_an_evaluation_keeps_warmup_samples_of_the_tenants_own_sets_only(
    scientist, reviewer, staff, tenant, artifacts_dir, tmp_path, settings
):
    settings.TRAINING_WORK_DIR = tmp_path / "work"
    version = registered_version(scientist, tenant, tmp_path)
    own = DatasetVersion.objects.get(
        pk=make_training_version(reviewer, name="own-golden", kind="golden")
    )
    shared = shared_golden_version(staff)
    for dataset_version in (own, shared):
        # Queued as evaluation_request queues it; this test runs the task itself.
        evaluation = Evaluation.objects.create(
            tenant=tenant, model_version=version, dataset_version=dataset_version,
            artifact_sha256=version.sha256,
        )  # fmt: skip
        assert run_evaluation(evaluation.pk) == "succeeded", Evaluation.objects.get(
            pk=evaluation.pk
        ).error
    by_set = {e.dataset_version_id: e for e in Evaluation.objects.filter(model_version=version)}
    golden_texts = {row["text"] for row in csv.DictReader(io.StringIO(banking_slice().decode()))}
    own_texts = {s["text"] for s in by_set[own.pk].samples}
    assert own_texts and own_texts <= golden_texts
    # Measured on the shared set all the same, but none of its rows kept.
    assert by_set[shared.pk].metrics["rows"] == 2
    assert by_set[shared.pk].samples == []
    assert SHARED_TEXT not in str(by_set[shared.pk].metrics)
