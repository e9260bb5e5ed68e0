"""The deployments dashboard: what is live, the list with filters and pages, a deployment's
page, the warm-up / rollback / retire buttons with their roles and conflicts, and the fleet.

Deployments are rows made through the services (a promotion approved through
``promotion_approve`` creates one; ``deployment_claim`` / ``deployment_go_live`` /
``deployment_fail`` move it on as the load task would) or created directly in a given
status, as ``tests/test_deployments_api.py`` does. No Celery worker runs: tasks enqueued on
commit are captured, not executed. The fleet page's rendering of a status is tested
through ``charts.fleet_view`` and the template with a status dict built here; the page
itself runs against a real Ray fleet (``ray_address``) once that fixture exists.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.template.loader import render_to_string
from django.test import Client, RequestFactory
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.deployments import alerts, services
from apps.deployments.backends import get_backend, reset_backend
from apps.deployments.charts import deployment_ids, fleet_view, memory_bar
from apps.deployments.models import Deployment, FleetAlert, Warmup
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions import services as promotions
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_create
from apps.tenants.models import Tenant
from apps.training import services as training
from tests.conftest import Actor
from tests.training_helpers import make_training_version

BASE = "/t/acme/deployments"
MIB = 2**20

pytestmark = pytest.mark.django_db


def login(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def make_version(actor: Actor, tenant: Tenant, name: str = "intents") -> ModelVersion:
    found = DatasetVersion.objects.filter(dataset__tenant=tenant, dataset__name="intents").first()
    data = found or DatasetVersion.objects.get(pk=make_training_version(actor))
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=data,
                              base_model="tiny-bert", params={}, model_name=name)  # fmt: skip
    return model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256="ab" * 32, size_bytes=1,
        memory_bytes=3 * MIB, predictions_key="models/x/p.jsonl", labels=["a"], metrics={},
    )  # fmt: skip


def deploy(version: ModelVersion, status: str, environment: str = "production", **extra: Any):
    return Deployment.objects.create(
        tenant=version.registered_model.tenant, model_version=version, environment=environment,
        artifact_sha256=version.sha256, status=status, **extra,
    )  # fmt: skip


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def row_of(body: str, deployment: Deployment) -> str:
    found = re.search(rf'<tr data-deployment="{deployment.pk}".*?</tr>', body, re.S)
    assert found is not None, f"no row for {deployment.pk}"
    return found.group(0)


@pytest.fixture
def version(scientist: Actor, tenant: Tenant, artifacts_dir: Any) -> ModelVersion:
    return make_version(scientist, tenant)


@pytest.fixture
def warm(version: ModelVersion) -> Deployment:
    return deploy(version, "warm", warm_at=timezone.now(), last_warmup_at=timezone.now(),
                  last_warmup_ms=12.34)  # fmt: skip


@pytest.fixture
def replaced(
    scientist: Actor, tenant: Tenant, version: ModelVersion
) -> tuple[Deployment, Deployment]:
    """v1 was live yesterday and is kept as a standby; v2 replaced it and serves now."""
    old = deploy(version, "retired", warm_at=timezone.now() - timedelta(days=1), standby=True,
                 retired_at=timezone.now())  # fmt: skip
    newer = make_version(scientist, tenant)
    current = deploy(newer, "warm", warm_at=timezone.now(), replaces=old)
    return old, current


# --- pages and isolation ------------------------------------------------------------------


@pytest.mark.parametrize("who", ["admin", "reviewer", "scientist", "viewer"])
def test_pages_open_for_every_member(warm, who, request):
    client = login(request.getfixturevalue(who))
    for path, marker in [(f"{BASE}/", "deployment-list-page"),
                         (f"{BASE}/{warm.pk}/", "deployment-detail-page")]:  # fmt: skip
        response = client.get(path)
        assert response.status_code == 200, path
        assert f'id="{marker}"' in response.content.decode()


def test_outsider_gets_404_everywhere_and_changes_nothing(warm, outsider, reviewer):
    client = login(outsider)
    for path in (f"{BASE}/", f"{BASE}/{warm.pk}/"):
        assert client.get(path).status_code == 404, path
    for action in ("warmup", "rollback", "retire"):
        assert client.post(f"{BASE}/{warm.pk}/{action}/").status_code == 404
    # Through the outsider's own tenant the id is unknown too.
    assert client.get(f"/t/globex/deployments/{warm.pk}/").status_code == 404
    assert client.post(f"/t/globex/deployments/{warm.pk}/retire/").status_code == 404
    assert Deployment.objects.get(pk=warm.pk).status == "warm"
    assert not AuditEvent.objects.filter(object_id=warm.pk).exists()
    assert login(reviewer).get(f"{BASE}/dep_nope/").status_code == 404


def test_anonymous_is_sent_to_login(warm):
    for path in (f"{BASE}/", "/fleet/"):
        response = Client().get(path)
        assert response.status_code == 302 and "/login/" in response["Location"], path


def test_nav_links_deployments_and_fleet(viewer, tenant):
    body = login(viewer).get(f"{BASE}/").content.decode()
    assert f'href="{BASE}/" aria-current="page">Deployments<' in body
    assert 'href="/fleet/"' in body


def test_get_on_a_button_url_is_refused(warm, reviewer):
    assert login(reviewer).get(f"{BASE}/{warm.pk}/warmup/").status_code == 405


# --- what is live -------------------------------------------------------------------------


def test_what_is_live_per_model_and_environment(
    version, warm, scientist, tenant, reviewer, django_assert_max_num_queries
):
    alerts.alert_raise(tenant=tenant, deployment=warm, kind="warmup_failed",
                       message="Warm-up of intents v1 failed: 2 of 16 differ")  # fmt: skip
    # Staging: the only deployment failed, nothing serves.
    deploy(version, "failed", environment="staging", failure="the model failed to load: boom")
    # Another model: v1 serves while v2 loads.
    other_v1 = make_version(scientist, tenant, name="fraud")
    other_v2 = make_version(scientist, tenant, name="fraud")
    serving = deploy(other_v1, "warm", warm_at=timezone.now() - timedelta(hours=2))
    loading = deploy(other_v2, "loading", replaces=serving)

    client = login(reviewer)
    with django_assert_max_num_queries(20):  # a fixed number, not one per deployment
        response = client.get(f"{BASE}/")
    body = response.content.decode()
    live = [(r.model, r.environment) for r in response.context["live"]]
    assert live == [("fraud", "production"), ("intents", "production"), ("intents", "staging")]

    table = re.search(r'<table class="table" id="live-table">.*?</table>', body, re.S)
    assert table is not None
    rows = {
        (m.group(1), m.group(2)): m.group(0)
        for m in re.finditer(
            r'<tr data-model="([^"]+)" data-environment="([^"]+)".*?</tr>', table.group(0), re.S
        )
    }
    intents = rows[("intents", "production")]
    assert ">v1</a>" in intents and "status-warm" in intents
    assert "12.3 ms" in intents  # the last warm-up's median latency
    assert '<span class="badge alert-open">1</span>' in intents
    staging = rows[("intents", "staging")]
    assert "nothing serves" in staging and "the model failed to load: boom" in staging
    fraud = rows[("fraud", "production")]
    assert ">v1</a>" in fraud and "status-loading" in fraud  # v1 serves, v2 loads
    assert f"deployments/{loading.pk}/" in fraud
    # Something is loading: the page re-reads itself.
    assert 'http-equiv="refresh"' in body


def test_an_alert_of_no_deployment_shows_above_the_list(warm, tenant, other_tenant, viewer):
    FleetAlert.objects.create(tenant=tenant, deployment=None, kind="load_failing",
                              message="the classifier pool cannot start")  # fmt: skip
    FleetAlert.objects.create(tenant=other_tenant, deployment=None, kind="load_failing",
                              message="globex's own trouble")  # fmt: skip
    body = login(viewer).get(f"{BASE}/").content.decode()
    alerts_box = re.search(r'<ul class="alert-list" id="tenant-alerts">.*?</ul>', body, re.S)
    assert alerts_box is not None and "the classifier pool cannot start" in alerts_box.group(0)
    assert "globex" not in body


def test_nothing_deployed_says_so(viewer, tenant):
    body = login(viewer).get(f"{BASE}/").content.decode()
    assert 'id="live-empty"' in body and 'id="deployments-empty"' in body
    assert 'http-equiv="refresh"' not in body


# --- the list -----------------------------------------------------------------------------


def test_list_filters_and_paginates(
    version, scientist, tenant, viewer, django_assert_max_num_queries
):
    for _ in range(26):
        deploy(version, "retired", retired_at=timezone.now())
    failed = deploy(version, "failed", environment="staging", failure="no capacity")
    fraud = make_version(scientist, tenant, name="fraud")
    fraud_warm = deploy(fraud, "warm", warm_at=timezone.now())

    client = login(viewer)
    with django_assert_max_num_queries(20):
        first = client.get(f"{BASE}/")
    assert len(first.context["rows"]) == 25
    assert "Page 1 of 2 · 28 deployments" in first.content.decode()
    second = client.get(f"{BASE}/?page=2")
    assert len(second.context["rows"]) == 3

    def ids(query: str) -> list[str]:
        response = client.get(f"{BASE}/?{query}")
        assert response.status_code == 200
        return [r.deployment.pk for r in response.context["rows"]]

    assert ids("status=warm") == [fraud_warm.pk]
    assert ids("environment=staging") == [failed.pk]
    assert ids("model=fraud") == [fraud_warm.pk]
    assert ids("model=intents&status=failed") == [failed.pk]
    body = client.get(f"{BASE}/?status=pending").content.decode()
    assert "No deployment matches these filters." in body
    # A bad value is named next to its field; the list is not filtered by it.
    bad = client.get(f"{BASE}/?status=bogus&environment=staging")
    assert bad.status_code == 200 and b"Select a valid choice" in bad.content
    assert [r.deployment.pk for r in bad.context["rows"]] == [failed.pk]
    # Page links keep the filters.
    body = client.get(f"{BASE}/?status=retired").content.decode()
    assert f'href="{BASE}/?status=retired&amp;page=2"' in body


# --- roles --------------------------------------------------------------------------------


def test_viewer_sees_no_buttons_and_is_refused_with_nothing_changed(replaced, viewer):
    _, current = replaced
    client = login(viewer)
    for path in (f"{BASE}/", f"{BASE}/{current.pk}/"):
        body = client.get(path).content.decode()
        for action in ("warmup", "rollback", "retire"):
            assert f"/{action}/" not in body, (path, action)
    for action in ("warmup", "rollback", "retire"):
        response = client.post(f"{BASE}/{current.pk}/{action}/", {"back": "list"})
        assert response.status_code == 403, action
        assert "reviewer" in response.content.decode() or "scientist" in response.content.decode()
    assert Deployment.objects.count() == 2
    assert Deployment.objects.get(pk=current.pk).status == "warm"
    assert not AuditEvent.objects.filter(verb__startswith="deployment.").exists()


def test_scientist_may_warm_up_but_not_roll_back_or_retire(replaced, scientist):
    _, current = replaced
    client = login(scientist)
    body = client.get(f"{BASE}/{current.pk}/").content.decode()
    assert f'action="{BASE}/{current.pk}/warmup/"' in body
    assert "/rollback/" not in body and "/retire/" not in body
    for action in ("rollback", "retire"):
        response = client.post(f"{BASE}/{current.pk}/{action}/")
        assert response.status_code == 403
        assert "needs the &#x27;reviewer&#x27; role" in response.content.decode()
    assert Deployment.objects.count() == 2
    assert Deployment.objects.get(pk=current.pk).status == "warm"


# --- the buttons --------------------------------------------------------------------------


def test_warm_up_from_the_list_keeps_the_filters(
    warm, reviewer, django_capture_on_commit_callbacks
):
    client = login(reviewer)
    body = client.get(f"{BASE}/?environment=production").content.decode()
    action = f"{BASE}/{warm.pk}/warmup/?environment=production"
    assert f'action="{action}"' in row_of(body, warm)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(action, {"back": "list"})
    assert response.status_code == 302
    assert response["Location"] == f"{BASE}/?environment=production"
    assert len(callbacks) == 1  # the warm-up task, enqueued on commit
    page = client.get(response["Location"])
    assert any("Warm-up of intents v1 in production requested" in m for m in messages_of(page))
    event = AuditEvent.objects.get(verb="deployment.warmup_requested", object_id=warm.pk)
    assert event.actor == reviewer.user and event.via == "session"


def test_warm_up_of_a_deployment_that_is_not_warm_is_409_inline(version, scientist):
    loading = deploy(version, "loading")
    response = login(scientist).post(f"{BASE}/{loading.pk}/warmup/", {"back": "list"})
    assert response.status_code == 409
    body = response.content.decode()
    assert f'id="refused-{loading.pk}"' in body
    assert "This deployment is loading; only a warm deployment is re-warmed." in body
    # The re-rendered list links back to itself, not to the button's URL.
    assert 'http-equiv="refresh"' not in body
    assert not AuditEvent.objects.filter(object_id=loading.pk).exists()


def test_reviewer_rolls_back_from_the_detail_page(
    replaced, reviewer, django_capture_on_commit_callbacks
):
    old, current = replaced
    client = login(reviewer)
    body = client.get(f"{BASE}/{current.pk}/").content.decode()
    assert f'action="{BASE}/{current.pk}/rollback/"' in body
    assert "Roll back to v1" in body
    assert 'data-confirm="Roll intents in production back from v2 to v1?' in body
    assert re.search(r'id="rollback-target">v1 \(' + old.pk + r", still loaded\)", body)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(f"{BASE}/{current.pk}/rollback/", {"back": "detail"}, follow=True)
    rollback = Deployment.objects.get(is_rollback=True)
    assert response.redirect_chain[-1][0] == f"{BASE}/{rollback.pk}/"
    assert len(callbacks) == 1  # the load task
    assert rollback.model_version == old.model_version and rollback.replaces == current
    assert rollback.status == "pending" and rollback.created_by == reviewer.user
    assert any("back to v1" in m and "v2 keeps serving until it is warm" in m
               for m in messages_of(response))  # fmt: skip
    body = response.content.decode()
    assert "a rollback by rita" in body and 'http-equiv="refresh"' in body
    assert Deployment.objects.get(pk=current.pk).status == "warm"  # still serving

    # A second rollback while the first loads: the service's conflict, shown inline.
    again = client.post(f"{BASE}/{current.pk}/rollback/", {"back": "detail"})
    assert again.status_code == 409
    text = again.content.decode()
    assert 'id="refused"' in text and f"Deployment {rollback.pk} of this model is pending" in text
    assert Deployment.objects.filter(is_rollback=True).count() == 1


def test_rollback_without_an_earlier_version_is_hidden_and_409_inline(warm, reviewer):
    client = login(reviewer)
    body = client.get(f"{BASE}/").content.decode()
    assert "/rollback/" not in row_of(body, warm)
    response = client.post(f"{BASE}/{warm.pk}/rollback/?status=warm", {"back": "list"})
    assert response.status_code == 409
    body = response.content.decode()
    assert f'id="refused-{warm.pk}"' in body
    assert "There is no earlier version of this model to roll back to." in body
    assert [r.deployment.pk for r in response.context["rows"]] == [warm.pk]  # filter kept
    assert Deployment.objects.count() == 1


def test_admin_retires_from_the_list_and_a_second_retire_is_409(
    warm, admin, django_capture_on_commit_callbacks
):
    client = login(admin)
    body = client.get(f"{BASE}/").content.decode()
    assert "It stops serving now" in row_of(body, warm)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(f"{BASE}/{warm.pk}/retire/", {"back": "list"}, follow=True)
    assert response.redirect_chain[-1][0] == f"{BASE}/"
    assert len(callbacks) == 1  # the pool is re-applied without it
    assert any("retired from production" in m for m in messages_of(response))
    retired = Deployment.objects.get(pk=warm.pk)
    assert retired.status == "retired" and retired.retired_at is not None
    # Retired: no buttons left; the live table says nothing serves.
    body = response.content.decode()
    assert "/retire/" not in row_of(body, warm) and "nothing serves" in body
    again = client.post(f"{BASE}/{warm.pk}/retire/", {"back": "detail"})
    assert again.status_code == 409
    assert "This deployment is already retired." in again.content.decode()
    assert AuditEvent.objects.filter(verb="deployment.retire", object_id=warm.pk).count() == 1


def test_a_standby_can_be_retired(replaced, reviewer, django_capture_on_commit_callbacks):
    old, _ = replaced
    client = login(reviewer)
    body = client.get(f"{BASE}/{old.pk}/").content.decode()
    assert "standby" in body and f'action="{BASE}/{old.pk}/retire/"' in body
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(f"{BASE}/{old.pk}/retire/", follow=True)
    assert any("retired and unloaded" in m for m in messages_of(response))
    assert Deployment.objects.get(pk=old.pk).standby is False


# --- one deployment -----------------------------------------------------------------------


@pytest.fixture
def approved(scientist: Actor, reviewer: Actor, tenant: Tenant, version: ModelVersion):
    """A promotion approved through the services: its deployment exists, pending."""
    make_training_version(reviewer, name="golden", kind="golden")
    promotion = promotions.promotion_request(
        actor=scientist.user, tenant=tenant, model_version=version, target="staging"
    )
    Evaluation.objects.filter(pk__in=promotion.evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={"accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05, "latency_ms_p50": 3.0,
                 "latency_ms_p95": 5.0, "rows": 30},
    )  # fmt: skip
    checked = promotions.promotion_check(promotion_id=promotion.pk)
    assert checked is not None and checked.status == "awaiting_approval", checked
    promotions.promotion_approve(actor=reviewer.user, promotion=checked)
    return Deployment.objects.get(promotion=promotion)


def test_detail_of_a_deployment_from_its_promotion_to_warm(
    approved, reviewer, tenant, django_assert_max_num_queries
):
    client = login(reviewer)
    pending = client.get(f"{BASE}/{approved.pk}/")
    steps = {s.status: s.state for s in pending.context["timeline"]}
    assert steps == {"pending": "current", "loading": "todo", "warm": "todo", "retired": "todo"}
    body = pending.content.decode()
    assert 'http-equiv="refresh"' in body and 'id="warmups-empty"' in body
    assert f'href="/t/acme/reviews/{approved.promotion_id}/"' in body
    assert "requested by sam" in body

    claimed = services.deployment_claim(deployment_id=approved.pk)
    assert claimed is not None
    now = timezone.now()
    Warmup.objects.create(
        deployment=approved, trigger="deploy", ok=False, samples=16, latency_ms_p50=30.5,
        latency_ms_max=44.0, latency_budget_ms=25, finished_at=now,
        error="2 of 16 predictions differ from the evaluation's",
        mismatches=[{"text": "my card is lost", "expected": "card_lost", "expected_score": 0.91,
                     "got": "balance", "got_score": 0.55}],
    )  # fmt: skip
    alert = alerts.alert_raise(tenant=tenant, deployment=claimed, kind="warmup_failed",
                               message="Warm-up of intents v1 failed")  # fmt: skip
    Warmup.objects.create(deployment=approved, trigger="deploy", ok=True, samples=16,
                          latency_ms_p50=8.25, latency_ms_max=11.0, latency_budget_ms=25,
                          finished_at=now)  # fmt: skip
    alerts.alerts_resolve(deployment=claimed, kind="warmup_failed")
    services.deployment_go_live(deployment=claimed)

    with django_assert_max_num_queries(20):
        response = client.get(f"{BASE}/{approved.pk}/")
    steps = {s.status: s.state for s in response.context["timeline"]}
    assert steps == {"pending": "done", "loading": "done", "warm": "current", "retired": "todo"}
    body = response.content.decode()
    assert 'http-equiv="refresh"' not in body
    table = re.search(r'<table class="table" id="warmup-table">.*?</table>', body, re.S)
    assert table is not None
    assert table.group(0).count("<tr data-warmup=") == 2
    assert 'data-ok="false"' in table.group(0) and "30.5 ms" in table.group(0)
    assert "my card is lost" in table.group(0) and "1 mismatch<" in table.group(0)
    svg = re.search(rf'<svg id="warmup-chart-{approved.pk}".*?</svg>', body, re.S)
    assert svg is not None and svg.group(0).count('<polyline class="series"') == 3
    assert f'data-alert="{alert.pk}" data-open="false"' in body
    history = re.findall(r'<li data-verb="([^"]+)"', body)
    assert history == ["deployment.create", "deployment.warm"]
    assert approved.artifact_sha256 in body


def test_detail_of_a_failed_deployment_shows_why(approved, reviewer):
    claimed = services.deployment_claim(deployment_id=approved.pk)
    assert claimed is not None
    services.deployment_fail(deployment=claimed, reason="insufficient capacity: need 9, have 4")
    response = login(reviewer).get(f"{BASE}/{approved.pk}/")
    steps = {s.status: s.state for s in response.context["timeline"]}
    assert steps == {"pending": "done", "loading": "done", "failed": "failed", "retired": "todo"}
    body = response.content.decode()
    assert 'id="deployment-failure"' in body and "insufficient capacity: need 9, have 4" in body
    assert re.findall(r'<li data-verb="([^"]+)"', body) == [
        "deployment.create",
        "deployment.failed",
    ]
    # A failed deployment can be retired (tidied away) by a reviewer, not re-warmed.
    assert "/retire/" in body and "/warmup/" not in body


def test_open_alerts_show_on_the_detail_page(warm, tenant, viewer):
    FleetAlert.objects.create(
        tenant=tenant,
        deployment=warm,
        kind="replica_restarting",
        message="replica set 0 restarted 3 times in the last hour",
    )
    body = login(viewer).get(f"{BASE}/{warm.pk}/").content.decode()
    assert "1 open" in body and "Replica keeps restarting" in body
    assert "restarted 3 times in the last hour" in body


# --- the fleet: rendering a status --------------------------------------------------------


def status_with(*, hidden: int = 2, hidden_bytes: int = 3 * MIB) -> dict[str, Any]:
    """A Ray fleet status (worker/serving/fleet.py's shape) as ``fleet_status_for`` returns
    it to a member of acme: acme's models named, two of other tenants' counted."""
    started = (timezone.now() - timedelta(hours=3)).timestamp()
    return {
        "pools": [
            {
                "kind": "classifier",
                "app": "workbench-classifier",
                "pool": {"kind": "classifier", "replica_memory_bytes": 64 * MIB, "max_sets": 4,
                         "tail_memory_bytes": 8 * MIB, "min_replicas": 1, "max_replicas": 2},
                "capacity": {"replica_memory_bytes": 16 * MIB, "max_sets": 2,
                             "tail_memory_bytes": 8 * MIB, "min_replicas": 1, "max_replicas": 2},
                "sets": [
                    {
                        "name": "classifier-set-0", "index": 0, "budget_bytes": 16 * MIB,
                        "min_replicas": 1, "max_replicas": 2, "models": ["mv_1"],
                        "replicas": [
                            {
                                "replica_id": "r-0a", "started_at": started, "device": "cpu",
                                "version": "abc", "rss_bytes": 900 * MIB,
                                "memory_used_bytes": 7 * MIB,
                                "models": [
                                    {"model_id": "mv_1", "sha256": "ab" * 32, "pinned": True,
                                     "loaded": True, "memory_bytes": 4 * MIB, "load_ms": 31.0,
                                     "hits": 90, "misses": 10, "requests": 100, "errors": 0,
                                     "latency_ms_p50": 2.5, "latency_ms_p99": 9.75,
                                     "error": None,
                                     "tenant": "acme", "model": "intents", "version": 1,
                                     "deployments": [{"id": "dep_1", "environment": "production",
                                                      "status": "warm"}]},
                                ],
                                "other_tenants_models": hidden,
                                "other_tenants_memory_bytes": hidden_bytes,
                            }
                        ],
                    }
                ],
                "tail": {
                    "name": "classifier-tail", "index": -1, "budget_bytes": 8 * MIB,
                    "models": [],
                    "replicas": [
                        {
                            "replica_id": "r-tail", "started_at": started, "device": "cpu",
                            "models": [
                                # Over the tail's budget, and failing to load.
                                {"model_id": "mv_2", "pinned": False, "loaded": True,
                                 "memory_bytes": 9 * MIB, "tenant": "acme", "model": "intents",
                                 "version": 2, "error": "sha256 mismatch", "errors": 3},
                                # Asked for, not loaded: no memory counted.
                                {"model_id": "mv_3", "pinned": False, "loaded": False,
                                 "memory_bytes": 5 * MIB, "tenant": "acme", "model": "intents",
                                 "version": 3},
                            ],
                            "other_tenants_models": 0,
                            "other_tenants_memory_bytes": 0,
                        }
                    ],
                },
            }
        ]
    }  # fmt: skip


def test_fleet_view_bars_ratios_and_last_warmups():
    at = timezone.now() - timedelta(minutes=5)
    status = status_with()
    assert deployment_ids(status) == {"dep_1"}
    view = fleet_view(status, {"dep_1": (at, 7.5)})
    (pool,) = view.pools
    assert pool.kind == "classifier" and pool.replica_count == 2 and pool.model_count == 3
    assert pool.capacity_bytes == 32 * MIB  # the workbench's settings, not the backend's copy
    pinned, tail = pool.sets
    assert (pinned.title, tail.title) == ("Replica set 0", "Long-tail tier")
    assert tail.tail and tail.budget_bytes == 8 * MIB
    (replica,) = pinned.replicas
    assert replica.device == "cpu" and replica.started_at is not None
    assert timezone.now() - replica.started_at > timedelta(hours=2)
    (model,) = replica.models
    assert model.label == "intents v1" and model.hit_ratio_text == "90%"
    assert (model.p50_ms, model.p99_ms, model.load_ms) == (2.5, 9.75, 31.0)
    assert (model.last_warmup_at, model.last_warmup_ms) == (at, 7.5)
    # The replica's bar: 4 MiB of ours and 3 MiB of other tenants', against 16 MiB.
    assert [(s.name, s.width) for s in replica.bar.segments] == [
        ("mv_1", 90.0), ("other-tenants", 67.5),
    ]  # fmt: skip
    assert replica.bar.summary == "7.0\xa0MB of 16.0\xa0MB (44%)" and not replica.bar.over
    assert model.bar.segments[0].width == 30.0  # 4/16 of the small bar's 120 px
    # The tail replica holds more than its budget: the bar spans the use, the budget
    # marked; the model it has not loaded takes no room.
    (tail_replica,) = tail.replicas
    failing, asked = tail_replica.models
    assert tail_replica.bar.over and tail_replica.bar.budget_x == 320.0
    assert [s.name for s in tail_replica.bar.segments] == ["mv_2"] and not asked.loaded
    assert failing.hit_ratio is None and failing.hit_ratio_text == "—"
    assert failing.error == "sha256 mismatch" and failing.errors == 3
    assert failing.last_warmup_at is None


def test_fleet_view_of_a_sagemaker_status_reads_the_pool_level_models():
    # worker/serving/sagemaker.py: an endpoint instance lists model ids; their details and
    # metrics are the pool's "models".
    status = {
        "backend": "sagemaker",
        "pools": [{
            "kind": "classifier", "endpoint": "workbench-classifier",
            "spec": {"replica_memory_bytes": 10 * MIB, "max_sets": 1,
                     "tail_memory_bytes": 4 * MIB},
            "sets": [{"index": 0, "pinned_bytes": 2 * MIB, "capacity_bytes": 10 * MIB,
                      "replicas": [{"replica_id": "workbench-classifier/AllTraffic/0",
                                    "state": "InService", "models": ["mv_9"]}]}],
            "models": [{"model_id": "mv_9", "pinned": True, "memory_bytes": 2 * MIB,
                        "requests": 5, "errors": 1, "latency_ms_p50": 40.0,
                        "latency_ms_p99": 80.0, "tenant": "acme", "model": "intents",
                        "version": 4}],
        }],
    }  # fmt: skip
    ((replica,),) = [s.replicas for s in fleet_view(status).pools[0].sets]
    (model,) = replica.models
    assert model.label == "intents v4" and model.p99_ms == 80.0 and model.requests == 5
    assert replica.state == "InService" and replica.bar.summary.endswith("(20%)")


@pytest.mark.parametrize(
    "status",
    [{}, {"pools": None}, {"pools": [None, {"sets": "x", "tail": 3}]},
     {"pools": [{"kind": "embedding", "sets": [{"replicas": [{"models": [{"hits": True}]}]}]}]}],
)  # fmt: skip
def test_fleet_view_tolerates_missing_and_malformed_keys(status):
    view = fleet_view(status)
    for pool in view.pools:
        for set_ in pool.sets:
            for replica in set_.replicas:
                for model in replica.models:
                    assert model.hits is None and model.label == "?"


def test_memory_bar_without_a_budget_scales_to_the_use():
    bar = memory_bar([("a", "a", 2, "#000"), ("b", "b", 6, "#111")], None, width=100)
    assert [s.width for s in bar.segments] == [25.0, 75.0]
    assert bar.budget_x is None and bar.summary.endswith("(no budget known)")


def test_fleet_template_counts_other_tenants_models_without_naming_them(viewer):
    request = RequestFactory().get("/fleet/")
    request.user = viewer.user
    body = render_to_string(
        "deployments/fleet.html",
        {"fleet": fleet_view(status_with()), "member_of": {"acme"}, "nav_section": "fleet-page"},
        request=request,
    )
    assert 'id="pool-classifier"' in body
    assert "Other tenants' models: 2, 3.0\xa0MB" in body
    assert "intents v1" in body and "90%" in body and "9.8 ms" in body
    assert "Replica set 0" in body and "Long-tail tier" in body and "not loaded" in body
    assert 'href="/t/acme/deployments/dep_1/"' in body
    assert 'class="memory-bar over-budget"' in body and "sha256 mismatch" in body


# --- the fleet page -----------------------------------------------------------------------


def test_fleet_page_says_when_no_controller_has_published(viewer):
    response = login(viewer).get("/fleet/")
    assert response.status_code == 200  # the page never waits on the fleet
    body = response.content.decode()
    assert 'id="fleet-stale"' in body and "No fleet status has been published yet" in body
    assert 'href="/fleet/" aria-current="page">Fleet<' in body


@pytest.mark.parametrize("who", ["viewer", "staff"])
def test_fleet_page_shows_the_last_published_status_and_says_the_controller_is_gone(who, request):
    from apps.deployments.models import FleetLease, ServingPool

    seen = timezone.now() - timedelta(seconds=95)
    ServingPool.objects.create(
        kind="classifier", replica_memory_bytes=1024**2, max_sets=2, tail_memory_bytes=1024**2,
        min_replicas=1, max_replicas=1, observed_at=seen,
        observed={"kind": "classifier", "sets": [], "tail": {"name": "classifier-tail",
                                                               "replicas": []}},
    )  # fmt: skip
    FleetLease.objects.create(
        pk="fleet", holder="host:1", heartbeat_at=seen, expires_at=seen + timedelta(seconds=15),
        last_error="ConnectionError: ray-head:6379 refused",
    )  # fmt: skip
    response = login(request.getfixturevalue(who)).get("/fleet/")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="pool-classifier"' in body  # what was last seen
    assert "No fleet controller is running" in body and "as last seen 95 s ago" in body
    # Only staff see the controller's error (it names hosts and ports).
    assert ("ray-head:6379 refused" in body) == (who == "staff")


# --- the fleet: shared bases and adapters -------------------------------------------------

KIB = 2**10
BASE_SHA = "cd" * 32


def adapter_version(actor: Actor, tenant: Tenant, name: str, own_bytes: int) -> ModelVersion:
    """A tenant's adapter version on the shared MiniLM, as publish_run registers it."""
    from apps.datasets.models import Dataset

    dataset = Dataset.objects.create(tenant=tenant, name=f"{name}-data", kind="training")
    data = DatasetVersion.objects.create(
        dataset=dataset, number=1, sha256="ee" * 32, size_bytes=1, rows=10, format="csv",
        storage_key=f"x/{tenant.slug}/{name}", text_column="text", label_column="label",
        labels={"a": 10}, duplicate_texts=0, preview=[],
    )  # fmt: skip
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=data,
                              base_model="tiny-bert", params={}, model_name=name)  # fmt: skip
    return model_version_create(
        run=run, artifact_key=f"models/{name}/model.tar", sha256="ab" * 32, size_bytes=1,
        memory_bytes=own_bytes, predictions_key="", labels=["a"], metrics={},
        format="adapter", base_sha256=BASE_SHA, base_memory_bytes=87 * MIB,
    )  # fmt: skip


def replica_entry(version: ModelVersion, **extra: Any) -> dict[str, Any]:
    """A model as a replica of today's code reports it (worker/serving/app.py)."""
    return {"model_id": version.pk, "sha256": version.sha256, "pinned": True, "loaded": True,
            "format": version.format, "base_sha256": version.base_sha256,
            "memory_bytes": version.memory_bytes, "load_ms": 3.0, "hits": 1, "misses": 0,
            "requests": 1, "errors": 0, "latency_ms_p50": 1.0, "latency_ms_p99": 1.0,
            "error": None, **extra}  # fmt: skip


@pytest.fixture
def adapters_published(scientist, outsider, tenant, other_tenant) -> dict[str, Any]:
    """A published pool: one replica holding the shared base once and three adapters on it
    (acme's and two of globex's); the tail's replica runs older code (no bases, no format)
    and holds acme's full model."""
    from apps.deployments.models import FleetLease, ServingPool

    ours = adapter_version(scientist, tenant, "intents", 410 * KIB)
    theirs = [adapter_version(outsider, other_tenant, f"secret-{i}", 400 * KIB) for i in (1, 2)]
    full = make_version(scientist, tenant, name="full-intents")
    for version in (ours, *theirs, full):
        deploy(version, "warm")
    versions = [ours, *theirs]
    now = timezone.now()
    ServingPool.objects.create(
        kind="classifier", replica_memory_bytes=512 * MIB, max_sets=1, tail_memory_bytes=64 * MIB,
        min_replicas=1, max_replicas=1, observed_at=now,
        observed={
            "kind": "classifier", "app": "workbench-classifier",
            "sets": [{
                "name": "classifier-set-0", "index": 0, "budget_bytes": 512 * MIB,
                "models": [v.pk for v in versions],
                "replicas": [{
                    "replica_id": "r-0", "started_at": now.timestamp(), "device": "cpu",
                    "version": "abc", "rss_bytes": 900 * MIB,
                    "memory_used_bytes": 87 * MIB + 1210 * KIB, "socket_requests": 0,
                    "bases": [{"base_model": "minilm-l6-lora", "sha256": BASE_SHA,
                               "memory_bytes": 87 * MIB, "adapters": 3}],
                    "models": [replica_entry(v) for v in versions],
                }],
            }],
            "tail": {
                "name": "classifier-tail", "index": -1, "budget_bytes": 64 * MIB, "models": [],
                "replicas": [{"replica_id": "r-tail", "device": "cpu",
                              "models": [{"model_id": full.pk, "loaded": True,
                                          "memory_bytes": 3 * MIB}]}],
            },
        },
    )  # fmt: skip
    FleetLease.objects.create(pk="fleet", holder="host:1", heartbeat_at=now,
                              expires_at=now + timedelta(seconds=15))  # fmt: skip
    return {"ours": ours, "theirs": theirs, "full": full}


def test_fleet_api_shows_the_shared_base_and_only_the_callers_adapters(
    adapters_published, viewer, staff
):
    import json

    ours, theirs = adapters_published["ours"], adapters_published["theirs"]
    response = viewer.api("get", "/api/v1/fleet/")
    assert response.status_code == 200
    (pool,) = response.json()["pools"]
    (replica,) = pool["sets"][0]["replicas"]
    # The base is shared weights: named, with its bytes and every tenant's adapter count.
    assert replica["bases"] == [
        {
            "base_model": "minilm-l6-lora",
            "name": "all-MiniLM-L6-v2",
            "sha256": BASE_SHA,
            "memory_bytes": 87 * MIB,
            "adapters": 3,
        }
    ]
    (model,) = replica["models"]
    assert model["model_id"] == ours.pk and model["tenant"] == "acme"
    assert (model["format"], model["base_sha256"]) == ("adapter", BASE_SHA)
    assert model["memory_bytes"] == 410 * KIB  # its own, not the base's
    # globex's adapters: counted with their own bytes, never named.
    assert replica["other_tenants_models"] == 2
    assert replica["other_tenants_memory_bytes"] == 800 * KIB
    dumped = json.dumps(response.json())
    assert all(v.pk not in dumped for v in theirs) and "secret-" not in dumped
    # A replica of older code publishes no bases; the registry knows its model is full.
    (tail_replica,) = pool["tail"]["replicas"]
    assert tail_replica["bases"] == []
    assert [(m["format"], m["base_sha256"]) for m in tail_replica["models"]] == [("full", "")]
    # Staff see every adapter on the base.
    every = staff.api("get", "/api/v1/fleet/").json()
    shown = every["pools"][0]["sets"][0]["replicas"][0]["models"]
    assert sorted(m["model_id"] for m in shown) == sorted(v.pk for v in [ours, *theirs])
    assert {m["format"] for m in shown} == {"adapter"}


def test_fleet_page_draws_the_shared_base_once_and_the_tenants_adapters(adapters_published, viewer):
    ours, theirs = adapters_published["ours"], adapters_published["theirs"]
    body = login(viewer).get("/fleet/").content.decode()
    replica = re.search(r'<div class="replica" data-replica="r-0">.*?<p class="muted small '
                        r'other-tenants"', body, re.S)  # fmt: skip
    assert replica is not None
    html = replica.group(0)
    # The bar: the base as its own segment, then acme's adapter, then other tenants'.
    segments = re.findall(r'<rect class="segment" data-name="([^"]+)"', html)
    assert segments[:3] == [f"base-{BASE_SHA}", ours.pk, "other-tenants"]
    assert "all-MiniLM-L6-v2 (shared base) · 87.0\xa0MB · 3 adapters" in html
    assert "intents v1 (adapter): 410.0\xa0KB" in html
    # The line under the bar: the base (sha256 shortened), every tenant's adapter count.
    line = re.search(r'<p class="muted small replica-bases".*?</p>', html, re.S)
    assert line is not None
    assert "bases: <span" in line.group(0) and f'<code title="sha256 {BASE_SHA}">' in html
    assert f">{BASE_SHA[:12]}</code> 87.0\xa0MB" in line.group(0)
    assert "adapters: 3 (1 listed below)" in line.group(0)
    assert 'class="badge model-format"' in html
    assert all(v.pk not in body for v in theirs) and "secret-" not in body
    # The tail's replica runs older code: no base line, its full model as before.
    tail = body[body.index('data-replica="r-tail"') :]
    assert "replica-bases" not in tail and "full-intents v1" in tail


def test_fleet_view_counts_a_base_once_against_the_budget():
    status = status_with(hidden=1, hidden_bytes=400 * KIB)
    (replica,) = status["pools"][0]["sets"][0]["replicas"]
    replica["bases"] = [
        {
            "base_model": "minilm-l6-lora",
            "name": "all-MiniLM-L6-v2",
            "sha256": BASE_SHA,
            "memory_bytes": 8 * MIB,
            "adapters": 2,
        }
    ]
    replica["models"][0].update(format="adapter", base_sha256=BASE_SHA, memory_bytes=512 * KIB)
    (view_replica,) = fleet_view(status).pools[0].sets[0].replicas
    (base,) = view_replica.bases
    assert (base.name, base.short_sha256, base.adapters, base.own_adapters) == (
        "all-MiniLM-L6-v2", BASE_SHA[:12], 2, 1,
    )  # fmt: skip
    assert view_replica.adapter_count == 2 and view_replica.own_adapter_count == 1
    (model,) = view_replica.models
    assert model.adapter and model.base_sha256 == BASE_SHA
    # 8 MiB of base + 0.5 MiB adapter + 0.4 MiB other tenant's, against 16 MiB (360 px).
    assert [(s.name, s.width) for s in view_replica.bar.segments] == [
        (f"base-{BASE_SHA}", 180.0), ("mv_1", 11.25), ("other-tenants", 8.79),
    ]  # fmt: skip
    assert view_replica.bar.used_bytes == 8 * MIB + 912 * KIB


@pytest.mark.parametrize("bases", [None, "x", [None, 3, {"sha256": ""}, {"memory_bytes": "?"}]])
def test_fleet_view_without_bases_or_with_malformed_ones_draws_the_models(bases):
    status = status_with()
    (replica,) = status["pools"][0]["sets"][0]["replicas"]
    replica["bases"] = bases
    (view_replica,) = fleet_view(status).pools[0].sets[0].replicas
    assert view_replica.bases == [] and view_replica.adapter_count == 0
    assert [s.name for s in view_replica.bar.segments] == ["mv_1", "other-tenants"]


def test_a_sagemaker_status_keeps_other_tenants_models_unnamed_and_has_no_bases(
    scientist, outsider, tenant, other_tenant, viewer
):
    """worker/serving/sagemaker.py: an endpoint instance lists model ids; their details are
    the pool's ``models``, filtered like the replicas' (an artifact's S3 key names it)."""
    import json

    from apps.deployments.models import ServingPool

    ours = adapter_version(scientist, tenant, "intents", 410 * KIB)
    theirs = adapter_version(outsider, other_tenant, "secret-1", 400 * KIB)
    for version in (ours, theirs):
        deploy(version, "warm")
    pool = {
        "kind": "classifier", "endpoint": "workbench-classifier",
        "sets": [{"index": 0, "replicas": [{"replica_id": "workbench-classifier/AllTraffic/0",
                                            "state": "InService",
                                            "models": [ours.pk, theirs.pk]}]}],
        "models": [{"model_id": v.pk, "pinned": True, "memory_bytes": v.memory_bytes,
                    "artifact": f"s3://b/classifier/{v.pk}.tar.gz", "requests": 2}
                   for v in (ours, theirs)],
    }  # fmt: skip
    ServingPool.objects.create(
        kind="classifier", replica_memory_bytes=512 * MIB, max_sets=1, tail_memory_bytes=0,
        min_replicas=1, max_replicas=1, observed_at=timezone.now(), observed=pool,
    )  # fmt: skip
    seen = viewer.api("get", "/api/v1/fleet/").json()
    assert theirs.pk not in json.dumps(seen)
    (published,) = seen["pools"]
    assert [m["model_id"] for m in published["models"]] == [ours.pk]
    (replica,) = published["sets"][0]["replicas"]
    assert replica["bases"] == [] and replica["other_tenants_memory_bytes"] == 400 * KIB
    (model,) = replica["models"]
    assert (model["memory_bytes"], model["requests"]) == (410 * KIB, 2)
    assert (model["format"], model["base_sha256"]) == ("adapter", BASE_SHA)  # the registry's
    body = login(viewer).get("/fleet/").content.decode()
    assert f'<tr data-model="{ours.pk}">' in body and "410.0\xa0KB" in body
    assert "replica-bases" not in body and theirs.pk not in body


def test_deployment_page_of_an_adapter_reads_its_own_memory_and_the_shared_base(
    scientist, tenant, viewer
):
    deployment = deploy(adapter_version(scientist, tenant, "intents", 410 * KIB), "warm")
    body = login(viewer).get(f"{BASE}/{deployment.pk}/").content.decode()
    assert "adapter · 410.0\xa0KB own + shared base 87.0\xa0MB" in body
    assert f'title="base sha256 {BASE_SHA}"' in body


@pytest.fixture
def real_fleet(request, settings, artifacts_dir, tmp_path) -> Any:
    """The Ray fleet of ``ray_address`` (tests/conftest.py), with two tenants' models
    deployed to production through approved promotions."""
    address = request.getfixturevalue("ray_address")
    from apps.deployments import fleet as fleet_service
    from apps.deployments.models import ServingPool
    from tests.deploy_helpers import approve, register
    from tests.worker.serving.models import pack, train_tiny, variant

    settings.RAY_ADDRESS = address
    settings.SERVING_BACKEND = "ray"
    reset_backend()
    base = train_tiny(tmp_path / "base", seed=7)
    acme_model = pack(base, tmp_path / "acme.tar")
    globex_model = pack(variant(base, tmp_path / "globex", seed=3, noise=0.2),
                        tmp_path / "globex.tar")  # fmt: skip
    yield {"register": register, "approve": approve, "acme": acme_model, "globex": globex_model}
    # Leave the shared Ray empty for the next test.
    Deployment.objects.update(status="retired", standby=False)
    for pool in ServingPool.objects.all():
        fleet_service.pool_apply(kind=pool.kind, backend=get_backend())
    reset_backend()


@pytest.mark.django_db(transaction=True)
def test_fleet_page_on_a_real_fleet_hides_other_tenants_models(
    real_fleet, tenant, scientist, reviewer, viewer, other_tenant, outsider, staff
):
    from apps.tenants.models import Role
    from tests.conftest import make_actor

    register, approve = real_fleet["register"], real_fleet["approve"]
    ours = register(scientist, tenant, "intents", real_fleet["acme"])
    theirs = register(outsider, other_tenant, "secret-model", real_fleet["globex"])
    mine = approve(scientist, reviewer, ours, "production")
    approve(outsider, make_actor("gina", other_tenant, Role.REVIEWER), theirs, "production")
    mine.refresh_from_db()
    assert mine.status == "warm", mine.failure

    response = login(viewer).get("/fleet/")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="pool-classifier"' in body
    row = re.search(rf'<tr data-model="{ours.pk}">.*?</tr>', body, re.S)
    assert row is not None, "acme's model is not on the page"
    assert "intents v1" in row.group(0) and 'class="memory-bar' in row.group(0)
    assert f'href="/t/acme/deployments/{mine.pk}/"' in row.group(0)
    assert "ago" in row.group(0)  # its last warm-up, from the deployment row
    # globex's model: counted with its memory, never named.
    assert theirs.pk not in body and "secret-model" not in body
    assert re.search(r"Other tenants&#x27; models: 1, |Other tenants' models: 1, ", body)
    # Staff see every model by name.
    every = login(staff).get("/fleet/").content.decode()
    assert "secret-model v1" in every and "intents v1" in every
