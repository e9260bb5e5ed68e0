"""Campaigns without a worker: what a campaign launches in each tenant and why it skips
one, that nothing is launched twice, cancelling, the REST doors' refusals, and the fair
share the dispatcher keeps between a campaign's backlog and a tenant's own run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.audit.models import AuditEvent
from apps.campaigns import services
from apps.campaigns.models import Campaign, CampaignItem
from apps.tenants.models import Role, Tenant
from apps.tenants.services import tenant_create
from apps.training import fairshare
from apps.training import services as training
from apps.training.models import TrainingRun
from tests.conftest import make_actor
from tests.training_helpers import banking_slice, make_training_version

pytestmark = pytest.mark.django_db
CAMPAIGNS = "/api/v1/campaigns/"
RECIPE = {"base_model": "tiny-bert", "params": {"epochs": 1}}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- fair share (pure) ---------------------------------------------------------------------


def waiting(run_id: str, tenant: str, queue: str, minute: int) -> fairshare.Waiting:
    return fairshare.Waiting(
        run_id=run_id, tenant_id=tenant, queue=queue, created_at=T0 + timedelta(minutes=minute)
    )


def test_a_one_off_run_goes_before_a_campaigns_older_backlog():
    backlog = [waiting(f"c{i}", f"t{i}", "campaign:big", i) for i in range(50)]
    one_off = waiting("mine", "t99", "tenant:t99", 60)  # launched an hour after the campaign
    busy = [fairshare.Busy(tenant_id="t100", queue="campaign:big")]
    chosen = fairshare.pick(
        [*backlog, one_off], busy, budget=2, tenant_limit={f"t{i}": 2 for i in range(101)}
    )
    # One slot free: the one-off run's queue uses none, the campaign's uses one.
    assert chosen == ["mine"]


def test_the_budget_is_shared_by_weight_and_oldest_first_within_a_queue():
    runs = [waiting(f"a{i}", f"ta{i}", "campaign:a", i) for i in range(10)]
    runs += [waiting(f"b{i}", f"tb{i}", "campaign:b", 100 + i) for i in range(10)]
    limits = {r.tenant_id: 1 for r in runs}
    chosen = fairshare.pick(
        runs, [], budget=6, tenant_limit=limits, weights={"campaign:a": 2.0, "campaign:b": 1.0}
    )
    assert len(chosen) == 6
    assert [c for c in chosen if c.startswith("a")] == ["a0", "a1", "a2", "a3"]
    assert [c for c in chosen if c.startswith("b")] == ["b0", "b1"]


def test_a_tenant_at_its_limit_is_passed_over_and_the_budget_holds():
    runs = [waiting("x1", "t1", "tenant:t1", 0), waiting("x2", "t1", "tenant:t1", 1)]
    runs += [waiting("y1", "t2", "campaign:c", 2)]
    busy = [fairshare.Busy(tenant_id="t1", queue="tenant:t1")]
    assert fairshare.pick(runs, busy, budget=5, tenant_limit={"t1": 2, "t2": 1}) == ["y1", "x1"]
    assert fairshare.pick(runs, busy, budget=1, tenant_limit={"t1": 2, "t2": 1}) == []


# --- a campaign over tenants -------------------------------------------------------------


@pytest.fixture
def fleet_of_tenants(tenant, artifacts_dir):
    """acme (data), beta (too few rows), gamma (no dataset), delta (data); one scientist
    and one staff user who runs the campaign."""
    for slug in ("beta", "gamma", "delta"):
        tenant_create(actor=None, slug=slug, name=slug.title(), domain="banking")
    scientist = make_actor("sam", tenant, Role.SCIENTIST)
    from apps.tenants.models import Tenant
    from apps.tenants.services import membership_add

    for slug in ("beta", "gamma", "delta"):
        membership_add(
            actor=None, tenant=Tenant.objects.get(slug=slug), user=scientist.user,
            role=Role.SCIENTIST,
        )  # fmt: skip
    make_training_version(scientist, tenant="acme")
    make_training_version(scientist, tenant="beta", content=banking_slice(per_label=3))
    make_training_version(scientist, tenant="delta")
    return make_actor("stella", None, None, is_staff=True)


def test_a_campaign_launches_once_per_tenant_and_says_why_it_skipped_the_rest(
    fleet_of_tenants, django_capture_on_commit_callbacks
):
    staff = fleet_of_tenants
    body = {"model_name": "intents", "tenants": "all", "recipe": RECIPE, "target": "staging"}
    with django_capture_on_commit_callbacks(execute=False):
        response = staff.api("post", CAMPAIGNS, body)
    assert response.status_code == 201, response.content
    campaign_id = response.json()["id"]
    assert response.json()["progress"]["counts"] == {"pending": 4}

    services.campaign_advance(campaign_id=campaign_id)
    services.campaign_advance(campaign_id=campaign_id)  # a redelivered task: nothing twice
    items = staff.api("get", f"{CAMPAIGNS}{campaign_id}/items/").json()["results"]
    by_tenant = {i["tenant"]: i for i in items}
    assert {t: (i["status"], i["skip_reason"]) for t, i in by_tenant.items()} == {
        "acme": ("training", ""),
        "beta": ("skipped", "too_few_rows"),
        "delta": ("training", ""),
        "gamma": ("skipped", "no_data"),
    }
    assert "fewer than 5 rows" in by_tenant["beta"]["detail"]
    assert "no training dataset named 'intents'" in by_tenant["gamma"]["detail"]
    runs = TrainingRun.objects.filter(campaign_item__campaign_id=campaign_id)
    assert runs.count() == 2 and TrainingRun.objects.count() == 2
    assert {r.params["epochs"] for r in runs} == {1} and {r.model_name for r in runs} == {"intents"}
    assert all(r.created_by_id == staff.user.pk for r in runs)  # the campaign's requester

    detail = staff.api("get", f"{CAMPAIGNS}{campaign_id}/").json()
    assert detail["progress"]["counts"] == {"training": 2, "skipped": 2}
    assert detail["progress"]["skipped"] == {"too_few_rows": 1, "no_data": 1}
    assert detail["progress"]["done_fraction"] == 0.5
    filtered = staff.api("get", f"{CAMPAIGNS}{campaign_id}/items/?status=skipped").json()
    assert sorted(i["tenant"] for i in filtered["results"]) == ["beta", "gamma"]

    # Cancelling: the queued runs are cancelled, the campaign ends, a second cancel is a 409.
    cancelled = staff.api("post", f"{CAMPAIGNS}{campaign_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert set(runs.values_list("status", flat=True)) == {"cancelled"}
    assert cancelled.json()["progress"]["counts"] == {"cancelled": 2, "skipped": 2}
    assert staff.api("post", f"{CAMPAIGNS}{campaign_id}/cancel").status_code == 409
    verbs = AuditEvent.objects.filter(object_id=campaign_id).values_list("verb", flat=True)
    assert sorted(verbs) == ["campaign.cancel", "campaign.create"]


def test_the_last_recipe_repeats_each_tenants_last_successful_configuration(fleet_of_tenants):
    staff = fleet_of_tenants
    acme_run = TrainingRun.objects.create(
        tenant=Tenant.objects.get(slug="acme"),
        dataset_version_id=make_training_version(staff_member(staff), tenant="acme", name="x"),
        model_name="intents", base_model="tiny-bert", params={**training_defaults(), "seed": 7},
        status="succeeded", finished_at=T0,
    )  # fmt: skip
    campaign = services.campaign_create(
        actor=staff.user, name="", model_name="intents", selection={"tenants": ["acme", "delta"]},
        recipe={"last": True}, target="staging",
    )  # fmt: skip
    services.campaign_advance(campaign_id=campaign.pk)
    items = {i.tenant.slug: i for i in CampaignItem.objects.filter(campaign=campaign)}
    assert items["delta"].skip_reason == "no_previous_run"
    assert items["acme"].run is not None and items["acme"].run.params["seed"] == 7
    assert items["acme"].run.pk != acme_run.pk


def staff_member(staff):
    """The staff user as a scientist of acme (to upload there)."""
    from apps.tenants.models import Tenant
    from apps.tenants.services import membership_add

    membership_add(actor=None, tenant=Tenant.objects.get(slug="acme"), user=staff.user,
                   role=Role.SCIENTIST)  # fmt: skip
    return staff


def training_defaults():
    from apps.training.params import params_resolve

    resolved, problems = params_resolve(base_model="tiny-bert", given={})
    assert not problems
    return resolved


def test_a_new_data_trigger_fires_once_per_new_version(fleet_of_tenants):
    staff = fleet_of_tenants
    campaign = services.campaign_create(
        actor=staff.user, name="", model_name="intents", selection={"tenants": "all"},
        recipe=dict(RECIPE), target="staging", trigger="new_data",
    )  # fmt: skip
    services.campaign_advance(campaign_id=campaign.pk)
    assert not CampaignItem.objects.filter(campaign=campaign).exists()  # old data fires nothing
    scientist = make_actor("sol", None, None)
    staff_member(scientist)
    # A second version of acme's dataset: one item, keyed by that version.
    from apps.datasets.models import Dataset

    dataset = Dataset.objects.get(tenant__slug="acme", name="intents")
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = scientist.client.post(
        f"/api/v1/tenants/acme/datasets/{dataset.pk}/versions/",
        {"file": SimpleUploadedFile("v2.csv", banking_slice(offset=30))},
    )
    assert response.status_code == 201
    services.campaign_advance(campaign_id=campaign.pk)
    services.campaign_advance(campaign_id=campaign.pk)
    (item,) = CampaignItem.objects.filter(campaign=campaign)
    assert item.trigger_key == response.json()["id"] == item.run.dataset_version_id
    assert Campaign.objects.get(pk=campaign.pk).status == "active"  # it keeps listening


# --- the doors' refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenants": ["acme", "nope"]}, "tenants"),
        ({"tenants": "some"}, "tenants"),
        ({"tenants": "all", "domain": "banking"}, "tenants"),
        ({}, "domain"),
        ({"tenants": "all", "recipe": {"base_model": "gpt-17"}}, "recipe"),
        ({"tenants": "all", "recipe": {"base_model": "tiny-bert", "params": {"epochs": 0}}},
         "recipe"),
        ({"tenants": "all", "recipe": "first"}, "recipe"),
        ({"tenants": "all", "trigger": "schedule"}, "interval_seconds"),
        ({"tenants": "all", "interval_seconds": 3600}, "interval_seconds"),
        ({"tenants": "all", "model_name": "Bad Name"}, "model_name"),
        ({"tenants": "all", "target": "moon"}, "target"),
    ],
)  # fmt: skip
def test_bad_campaign_input_names_the_field_and_creates_nothing(tenant, body, field):
    staff = make_actor("stella", None, None, is_staff=True)
    payload = {"model_name": "intents", "recipe": RECIPE, **body}
    response = staff.api("post", CAMPAIGNS, payload)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]
    assert (
        not Campaign.objects.exists()
        and not AuditEvent.objects.filter(verb="campaign.create").exists()
    )


def test_only_staff_run_campaigns(tenant):
    admin = make_actor("ada", tenant, Role.ADMIN)
    body = {"model_name": "intents", "tenants": "all", "recipe": RECIPE}
    assert admin.api("post", CAMPAIGNS, body).status_code == 403
    assert admin.api("get", CAMPAIGNS).status_code == 403
    assert not Campaign.objects.exists()


def test_the_items_list_answers_in_constant_queries(fleet_of_tenants):
    staff = fleet_of_tenants
    campaign = services.campaign_create(
        actor=staff.user, name="", model_name="intents", selection={"tenants": "all"},
        recipe=dict(RECIPE), target="staging",
    )  # fmt: skip
    services.campaign_advance(campaign_id=campaign.pk)
    url = f"{CAMPAIGNS}{campaign.pk}/items/"
    staff.api("get", url)  # the token's first use of the day is recorded once
    with CaptureQueriesContext(connection) as few:
        assert len(staff.api("get", f"{url}?page_size=1").json()["results"]) == 1
    with CaptureQueriesContext(connection) as many:
        assert len(staff.api("get", f"{url}?page_size=4").json()["results"]) == 4
    assert len(many) == len(few), [q["sql"][:150] for q in many.captured_queries]


# --- the dispatcher ------------------------------------------------------------------------


def test_dispatch_keeps_the_budget_and_sends_a_one_off_run_before_the_backlog(
    fleet_of_tenants, settings, django_capture_on_commit_callbacks
):
    staff = fleet_of_tenants
    settings.TRAINING_MAX_CONCURRENT_RUNS = 1
    with django_capture_on_commit_callbacks(execute=False):
        campaign = services.campaign_create(
            actor=staff.user, name="", model_name="intents", selection={"tenants": "all"},
            recipe=dict(RECIPE), target="staging",
        )  # fmt: skip
        services.campaign_advance(campaign_id=campaign.pk)
        campaign_runs = list(
            TrainingRun.objects.order_by("created_at").values_list("pk", flat=True)
        )
        # Then a scientist's own run in acme, after the campaign's two.
        from apps.datasets.models import DatasetVersion
        from apps.tenants.models import Tenant

        acme = Tenant.objects.get(slug="acme")
        mine = training.run_launch(
            actor=staff.user, tenant=acme, base_model="tiny-bert", params=training_defaults(),
            dataset_version=DatasetVersion.objects.filter(dataset__tenant=acme).first(),
            model_name="mine",
        )  # fmt: skip
        TrainingRun.objects.filter(pk=campaign_runs[0]).update(status="running", dispatched_at=T0)
        assert training.runs_dispatch() == []  # the budget of 1 is in use
        settings.TRAINING_MAX_CONCURRENT_RUNS = 2
        # One slot: the campaign already holds one, acme's own runs none — so acme's run
        # goes, though the campaign's waiting run is older.
        assert training.runs_dispatch() == [mine.pk]
        TrainingRun.objects.filter(pk=campaign_runs[0]).update(status="succeeded")
        assert training.runs_dispatch() == [campaign_runs[1]]


def test_a_schedule_fires_a_round_per_interval_and_each_round_once(
    fleet_of_tenants, django_capture_on_commit_callbacks
):
    staff = fleet_of_tenants
    with django_capture_on_commit_callbacks(execute=False):
        response = staff.api("post", CAMPAIGNS, {
            "model_name": "intents", "tenants": ["acme", "gamma"], "recipe": RECIPE,
            "trigger": "schedule", "interval_seconds": 3600,
        })  # fmt: skip
    assert response.status_code == 201, response.content
    campaign = Campaign.objects.get(pk=response.json()["id"])
    services.campaign_advance(campaign_id=campaign.pk)
    services.campaign_advance(campaign_id=campaign.pk)  # not due again for an hour
    keys = sorted(
        CampaignItem.objects.filter(campaign=campaign).values_list("trigger_key", "tenant__slug")
    )
    assert keys == [("round-1", "acme"), ("round-1", "gamma")]
    # An hour later (the clock moved on): round 2, once, while round 1's run still trains.
    Campaign.objects.filter(pk=campaign.pk).update(next_round_at=T0)
    services.campaign_advance(campaign_id=campaign.pk)
    services.campaign_advance(campaign_id=campaign.pk)
    rounds = CampaignItem.objects.filter(campaign=campaign, tenant__slug="acme")
    assert sorted(rounds.values_list("trigger_key", flat=True)) == ["round-1", "round-2"]
    assert TrainingRun.objects.filter(campaign_item__campaign=campaign).count() == 2
    assert Campaign.objects.get(pk=campaign.pk).status == "active"  # until it is cancelled
