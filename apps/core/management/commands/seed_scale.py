"""Seed a database in bulk with many tenants and their history, to measure pages at scale.

    manage.py seed_scale                      # 10,000 tenants, 100k runs, 30k models, ...
    manage.py seed_scale --tenants 50 --runs 500 --model-versions 150 \\
        --audit-events 5000 --metric-points 5000

Rows are written with ``bulk_create`` (no per-row services, no audit of the seeding itself,
no artifacts behind the keys): what the pages and lists read, in realistic proportions and
spread over the last year. Three accounts to look through, each with the password given by
``--password`` (default: unusable, i.e. sign in with ``force_login`` or a token):

* ``<prefix>-org``: an admin member of every seeded tenant (the user whose switcher and
  lists must not grow with the tenant count);
* ``<prefix>-staff``: staff, an org operator and org reviewer, a member of no tenant;
* ``<prefix>-one``: a scientist in the first tenant only;

and one admin per tenant (``<tenant slug>-admin``), the trainer and requester of its rows.
``--big-tenant-events`` gives the last tenant a long history of its own (a large customer:
the audit log's paging and counting are measured on it).
The seed refuses to run twice with the same prefix (audit events cannot be deleted); seed
a fresh database, or another prefix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import Iterator, Sequence
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.core import ids
from apps.datasets.models import Dataset, DatasetKind, DatasetVersion, Task
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions.models import PromotionRequest, PromotionStatus, Target
from apps.registry.models import ModelVersion, RegisteredModel, Stage
from apps.tenants.models import Membership, OrgRole, OrgRoleGrant, Role, Tenant
from apps.training.models import RunMetric, RunStatus, TrainingRun

CHUNK = 250  # tenants written per transaction
BATCH = 2000  # rows per INSERT
DOMAINS = ("banking", "retail", "travel", "telecom", "insurance")
MODEL_NAMES = ("intents", "routing", "sentiment", "escalation", "language")
LABELS = ("card_lost", "balance", "transfer", "refund", "pin_change", "top_up")
VERBS = (
    ("dataset.create", "dataset"),
    ("dataset_version.create", "dataset_version"),
    ("run.create", "training_run"),
    ("run.succeed", "training_run"),
    ("evaluation.create", "evaluation"),
    ("promotion.request", "promotion_request"),
    ("promotion.approve", "promotion_request"),
    ("membership.add", "membership"),
)
# Seeded promotions never sit in deploying/done/failed: those belong to promotions' own
# services (and a seeded `done` would claim a deployment that does not exist).
PROMOTION_MIX = (
    PromotionStatus.AWAITING_APPROVAL,
    PromotionStatus.APPROVED,
    PromotionStatus.REJECTED,
    PromotionStatus.GATES_FAILED,
)
YEAR = dt.timedelta(days=365)


@contextlib.contextmanager
def explicit_timestamps(*model_classes: type[models.Model]) -> Iterator[None]:
    """Let ``bulk_create`` keep the ``created_at`` the seed gives (``auto_now_add`` would
    overwrite it with now)."""
    fields = [m._meta.get_field("created_at") for m in model_classes]
    saved = [(f, f.auto_now_add) for f in fields]  # type: ignore[union-attr]
    try:
        for field in fields:
            field.auto_now_add = False  # type: ignore[union-attr]
        yield
    finally:
        for field, value in saved:
            field.auto_now_add = value  # type: ignore[union-attr]


def spread(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow (the first get the rest)."""
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


class Command(BaseCommand):
    help = "Seed many tenants with datasets, runs, models, metrics and audit events, in bulk."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenants", type=int, default=10_000)
        parser.add_argument("--runs", type=int, default=100_000, help="training runs in all")
        parser.add_argument("--models-per-tenant", type=int, default=3)
        parser.add_argument(
            "--model-versions", type=int, default=30_000, help="model versions in all"
        )
        parser.add_argument("--audit-events", type=int, default=1_000_000)
        parser.add_argument("--metric-points", type=int, default=1_000_000)
        parser.add_argument(
            "--big-tenant-events",
            type=int,
            default=0,
            help="audit events more for the last tenant (a large customer's long history)",
        )
        parser.add_argument("--prefix", default="scale", help="slug and username prefix")
        parser.add_argument("--password", default="", help="password of the three accounts")
        parser.add_argument("--seed", type=int, default=0, help="random seed")

    def handle(self, *args: Any, **options: Any) -> None:
        tenants = options["tenants"]
        if tenants < 1 or options["models_per_tenant"] < 1:
            raise CommandError("--tenants and --models-per-tenant must be at least 1.")
        if options["model_versions"] > options["runs"]:
            raise CommandError("Each model version comes from a run: --runs >= --model-versions.")
        counts = ("runs", "audit_events", "metric_points", "big_tenant_events")
        if min(options[c] for c in counts) < 0:
            raise CommandError("Counts cannot be negative.")
        prefix = options["prefix"]
        if Tenant.objects.filter(slug__startswith=f"{prefix}-").exists():
            raise CommandError(
                f"Tenants named '{prefix}-*' exist already: seed a fresh database or pass "
                "another --prefix (audit events cannot be deleted to start over)."
            )
        self.rng = random.Random(options["seed"])
        self.now = timezone.now()
        org, staff, one = self._accounts(prefix, options["password"])
        runs = spread(options["runs"], tenants)
        versions = spread(options["model_versions"], tenants)
        events = spread(options["audit_events"], tenants)
        points = spread(options["metric_points"], max(options["runs"], 1))
        width = len(str(tenants - 1))
        with explicit_timestamps(
            Tenant, Membership, Dataset, DatasetVersion, TrainingRun, RegisteredModel,
            ModelVersion, Evaluation, PromotionRequest, AuditEvent,
        ):  # fmt: skip
            run_offset = 0
            for start in range(0, tenants, CHUNK):
                numbers = range(start, min(start + CHUNK, tenants))
                with transaction.atomic():
                    self._chunk(
                        prefix=prefix,
                        width=width,
                        numbers=numbers,
                        org=org,
                        one=one if start == 0 else None,
                        runs=runs,
                        versions=versions,
                        events=events,
                        points=points[run_offset:],
                        models_per_tenant=options["models_per_tenant"],
                    )
                run_offset += sum(runs[i] for i in numbers)
                self.stdout.write(f"  {numbers[-1] + 1:,} / {tenants:,} tenants")
            if options["big_tenant_events"]:
                self._big_history(f"{prefix}-{tenants - 1:0{width}d}", options["big_tenant_events"])
        self.stdout.write(
            self.style.SUCCESS(
                f"Seeded {tenants:,} tenants, {options['runs']:,} runs, "
                f"{tenants * options['models_per_tenant']:,} models, "
                f"{options['model_versions']:,} model versions, "
                f"{options['audit_events']:,} audit events, "
                f"{options['metric_points']:,} metric points. Accounts: {org.get_username()} "
                f"(member of every tenant), {staff.get_username()} (staff), "
                f"{one.get_username()} (one tenant)."
            )
        )

    def _big_history(self, slug: str, count: int) -> None:
        tenant = Tenant.objects.get(slug=slug)
        admin = get_user_model().objects.get(username=f"{slug}-admin")
        for start in range(0, count, 50_000):
            with transaction.atomic():
                self._events(tenant, admin, min(50_000, count - start))
        self.stdout.write(f"  {count:,} more audit events for {slug}")

    def _events(self, tenant: Tenant, admin: Any, count: int) -> None:
        rows = []
        for _ in range(count):
            verb, object_type = self.rng.choice(VERBS)
            rows.append(
                AuditEvent(
                    id=ids.new_event_id(),
                    created_at=self._when(tenant.created_at),
                    tenant=tenant,
                    actor=admin,
                    actor_name=admin.get_username(),
                    via="session",
                    verb=verb,
                    object_type=object_type,
                    object_id=ids.new_id(object_type[:3]),
                    object_repr=f"{object_type} of {tenant.slug}",
                    after={"seeded": True},
                )
            )
        AuditEvent.objects.bulk_create(rows, batch_size=BATCH)

    def _accounts(self, prefix: str, password: str) -> tuple[Any, Any, Any]:
        users = get_user_model()
        made = []
        for suffix, is_staff in (("org", False), ("staff", True), ("one", False)):
            user = users(username=f"{prefix}-{suffix}", is_staff=is_staff)
            if password:
                user.set_password(password)
            else:
                user.set_unusable_password()
            user.save()
            made.append(user)
        OrgRoleGrant.objects.bulk_create(
            [OrgRoleGrant(user=made[1], role=r) for r in (OrgRole.OPERATOR, OrgRole.REVIEWER)]
        )
        return made[0], made[1], made[2]

    def _when(self, after: dt.datetime | None = None) -> dt.datetime:
        """A moment in the last year (after ``after`` when given)."""
        start = after or self.now - YEAR
        span = (self.now - start).total_seconds()
        return start + dt.timedelta(seconds=self.rng.random() * span)

    def _chunk(
        self,
        *,
        prefix: str,
        width: int,
        numbers: range,
        org: Any,
        one: Any | None,
        runs: Sequence[int],
        versions: Sequence[int],
        events: Sequence[int],
        points: Sequence[int],
        models_per_tenant: int,
    ) -> None:
        rng = self.rng
        users = get_user_model()
        tenants = [
            Tenant(
                slug=f"{prefix}-{n:0{width}d}",
                name=f"Customer {n:0{width}d}",
                domain=DOMAINS[n % len(DOMAINS)],
                created_at=self._when(),
            )
            for n in numbers
        ]
        Tenant.objects.bulk_create(tenants, batch_size=BATCH)
        admins = [users(username=f"{t.slug}-admin") for t in tenants]
        for admin in admins:
            admin.set_unusable_password()
        users.objects.bulk_create(admins, batch_size=BATCH)
        memberships = [
            Membership(tenant=t, user=a, role=Role.ADMIN, created_at=t.created_at)
            for t, a in zip(tenants, admins, strict=True)
        ]
        memberships += [
            Membership(tenant=t, user=org, role=Role.ADMIN, created_at=t.created_at)
            for t in tenants
        ]
        if one is not None:
            memberships.append(
                Membership(tenant=tenants[0], user=one, role=Role.SCIENTIST, created_at=self.now)
            )
        Membership.objects.bulk_create(memberships, batch_size=BATCH)

        datasets, dataset_versions = [], []
        for tenant, admin in zip(tenants, admins, strict=True):
            for kind, name in ((DatasetKind.TRAINING, "tickets"), (DatasetKind.GOLDEN, "golden")):
                dataset = Dataset(
                    tenant=tenant,
                    name=name,
                    kind=kind,
                    task=Task.TEXT_CLASSIFICATION,
                    domain=tenant.domain,
                    created_by=admin,
                    created_at=self._when(tenant.created_at),
                )
                datasets.append(dataset)
                for number in (1, 2):
                    rows = rng.randint(200, 5000)
                    dataset_versions.append(
                        DatasetVersion(
                            dataset=dataset,
                            number=number,
                            sha256=ids.new_id("seed").ljust(64, "0")[:64],
                            size_bytes=rows * 48,
                            storage_key=f"seed/{tenant.slug}/{name}/{number}.csv",
                            format=DatasetVersion.Format.CSV,
                            text_column="text",
                            label_column="label",
                            rows=rows,
                            labels={label: rows // len(LABELS) for label in LABELS},
                            duplicate_texts=0,
                            preview=[{"text": "I lost my card", "label": "card_lost"}],
                            original_filename=f"{name}.csv",
                            created_by=admin,
                            created_at=self._when(dataset.created_at),
                        )
                    )
        Dataset.objects.bulk_create(datasets, batch_size=BATCH)
        DatasetVersion.objects.bulk_create(dataset_versions, batch_size=BATCH)

        all_runs: list[TrainingRun] = []
        all_models: list[RegisteredModel] = []
        all_versions: list[ModelVersion] = []
        for i, (n, tenant, admin) in enumerate(zip(numbers, tenants, admins, strict=True)):
            train = dataset_versions[4 * i + 1]  # tickets v2
            models_here = [
                RegisteredModel(
                    tenant=tenant,
                    name=MODEL_NAMES[m % len(MODEL_NAMES)] + (f"-{m}" if m >= 5 else ""),
                    created_at=self._when(tenant.created_at),
                )
                for m in range(models_per_tenant)
            ]
            all_models += models_here
            tenant_runs = []
            for r in range(runs[n]):
                created = self._when(tenant.created_at)
                failed = rng.random() < 0.1 and r >= versions[n]
                accuracy = round(rng.uniform(0.6, 0.95), 4)
                tenant_runs.append(
                    TrainingRun(
                        tenant=tenant,
                        dataset_version=train,
                        model_name=models_here[r % models_per_tenant].name,
                        base_model="tiny-bert",
                        params={"epochs": 3, "learning_rate": 5e-4, "batch_size": 16},
                        status=RunStatus.FAILED if failed else RunStatus.SUCCEEDED,
                        progress={"epoch": 3, "epochs": 3},
                        metrics={} if failed else {"val_accuracy": accuracy, "val_loss": 0.4},
                        error="CUDA out of memory" if failed else "",
                        created_by=admin,
                        created_at=created,
                        dispatched_at=created,
                        started_at=created + dt.timedelta(seconds=5),
                        finished_at=created + dt.timedelta(seconds=rng.randint(60, 900)),
                        attempt=1,
                    )
                )
            all_runs += tenant_runs
            made: dict[int, int] = {}
            for r in range(versions[n]):
                run = tenant_runs[r]
                model = models_here[r % models_per_tenant]
                made[id(model)] = made.get(id(model), 0) + 1
                all_versions.append(
                    ModelVersion(
                        registered_model=model,
                        number=made[id(model)],
                        run=run,
                        artifact_key=f"seed/{tenant.slug}/{run.id}.tar",
                        sha256=ids.new_id("seed").ljust(64, "0")[:64],
                        size_bytes=17_000_000,
                        memory_bytes=45_000_000,
                        predictions_key=f"seed/{tenant.slug}/{run.id}.jsonl",
                        labels=dict(enumerate(LABELS)),
                        metrics=dict(run.metrics),
                        created_at=run.finished_at or self.now,
                    )
                )
        TrainingRun.objects.bulk_create(all_runs, batch_size=BATCH)
        RegisteredModel.objects.bulk_create(all_models, batch_size=BATCH)
        # The newest version of each model is in production, the one before in staging.
        newest: dict[str, ModelVersion] = {}
        for version in all_versions:
            key = version.registered_model.id
            if key not in newest or version.number > newest[key].number:
                newest[key] = version
        for version in newest.values():
            version.stage = Stage.PRODUCTION
        ModelVersion.objects.bulk_create(all_versions, batch_size=BATCH)

        golden = {dv.dataset.tenant_id: dv for dv in dataset_versions[3::4]}  # golden v2
        evaluations, promotions = [], []
        for version in all_versions:
            tenant = version.registered_model.tenant
            run = version.run
            evaluations.append(
                Evaluation(
                    tenant=tenant,
                    model_version=version,
                    dataset_version=golden[tenant.id],
                    status=EvalStatus.SUCCEEDED,
                    artifact_sha256=version.sha256,
                    metrics={"accuracy": run.metrics.get("val_accuracy", 0.0), "macro_f1": 0.8},
                    attempt=1,
                    requested_by=run.created_by,
                    created_at=version.created_at,
                    started_at=version.created_at,
                    finished_at=version.created_at + dt.timedelta(seconds=20),
                )
            )
            status = rng.choice(PROMOTION_MIX)
            promotions.append(
                PromotionRequest(
                    tenant=tenant,
                    model_version=version,
                    target=Target.PRODUCTION,
                    status=status,
                    artifact_sha256=version.sha256,
                    gate_results=[
                        {
                            "gate": "policy",
                            "dataset": golden[tenant.id].dataset.id,
                            "dataset_name": "golden",
                            "metric": "accuracy",
                            "op": ">=",
                            "threshold": 0.7,
                            "value": run.metrics.get("val_accuracy", 0.0),
                            "passed": status != PromotionStatus.GATES_FAILED,
                        }
                    ],
                    requested_by=run.created_by,
                    created_at=version.created_at + dt.timedelta(seconds=30),
                )
            )
        Evaluation.objects.bulk_create(evaluations, batch_size=BATCH)
        for promotion, evaluation in zip(promotions, evaluations, strict=True):
            promotion.evaluation_ids = [evaluation.id]
        PromotionRequest.objects.bulk_create(promotions, batch_size=BATCH)

        metric_rows = []
        for run, count in zip(all_runs, points, strict=False):
            loss = 2.0
            for step in range(1, count + 1):
                loss *= 0.9
                metric_rows.append(
                    RunMetric(run=run, name="train_loss", step=step * 10, value=round(loss, 4))
                )
        RunMetric.objects.bulk_create(metric_rows, batch_size=BATCH)

        for n, tenant, admin in zip(numbers, tenants, admins, strict=True):
            self._events(tenant, admin, events[n])
