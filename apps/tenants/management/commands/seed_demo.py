from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from apps.datasets import services as dataset_services
from apps.datasets.models import Dataset, Task, default_columns
from apps.tenants import services
from apps.tenants.models import Membership, Role, Tenant

DEMO_USERS = [("scientist", Role.SCIENTIST), ("reviewer", Role.REVIEWER), ("admin", Role.ADMIN)]
DEMO_PASSWORD = "workbench-demo"  # noqa: S105 - a local demo login, printed on purpose


def _default_data_dir(name: str = "banking77") -> Path:
    return Path(settings.BASE_DIR).parent / "shared" / "datasets" / name


def _staged(source: Path, tmp: Path) -> dataset_services.UploadedFile:
    """A copy of ``source`` as an upload (the store moves its file in)."""
    copy = tmp / source.name
    shutil.copyfile(source, copy)
    data = copy.read_bytes()
    return dataset_services.UploadedFile(
        path=copy,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        filename=source.name,
    )


class Command(BaseCommand):
    help = (
        "Create the demo tenant, its scientist/reviewer/admin users and demo datasets (idempotent)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="folder with banking77 train.csv and test.csv",
        )
        parser.add_argument(
            "--stackfaq-dir",
            type=Path,
            default=None,
            help="folder with stackfaq train.csv, test.csv and documents.csv (retrieval)",
        )
        parser.add_argument(
            "--replies-dir",
            type=Path,
            default=None,
            help="folder with an SGD service's agent replies, train.csv and test.csv "
            "(text-generation; default sgd-replies/banks_1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = Tenant.objects.filter(slug="demo").first()
        if tenant is None:
            tenant = services.tenant_create(
                actor=None, slug="demo", name="Demo Bank", domain="banking", via="cli"
            )
        user_model = get_user_model()
        users = {}
        for username, role in DEMO_USERS:
            user = user_model.objects.filter(username=username).first()
            if user is None:
                user = services.user_create(
                    username=username, password=DEMO_PASSWORD, email=f"{username}@demo.local"
                )
            if not Membership.objects.filter(tenant=tenant, user=user).exists():
                services.membership_add(actor=None, tenant=tenant, user=user, role=role, via="cli")
            users[username] = user

        data_dir: Path = options["data_dir"] or _default_data_dir()
        faq_dir: Path = options["stackfaq_dir"] or _default_data_dir("stackfaq")
        replies_dir: Path = options["replies_dir"] or _default_data_dir("sgd-replies/banks_1")
        # The golden sets are the reviewer's: golden and sample sets decide promotions, so
        # only reviewers and admins create and change them. A retrieval version is its pairs
        # with the knowledge base they point into (the same documents for train and test).
        # A reply corpus is the agents' replies of SGD's banking service, each with the
        # customer message it answers (its context column).
        classification, retrieval, replies = (
            Task.TEXT_CLASSIFICATION,
            Task.RETRIEVAL,
            Task.TEXT_GENERATION,
        )
        seeds = [
            ("banking77-train", "training", classification, data_dir / "train.csv", None),
            ("banking77-golden", "golden", classification, data_dir / "test.csv", None),
            (
                "stackfaq-train",
                "training",
                retrieval,
                faq_dir / "train.csv",
                faq_dir / "documents.csv",
            ),
            (
                "stackfaq-golden",
                "golden",
                retrieval,
                faq_dir / "test.csv",
                faq_dir / "documents.csv",
            ),
            ("sgd-banks-replies", "training", replies, replies_dir / "train.csv", None),
            ("sgd-banks-replies-golden", "golden", replies, replies_dir / "test.csv", None),
        ]
        descriptions = {
            classification: "banking77 {}: customer-support queries, 77 intents",
            retrieval: "StackFAQ {}: questions and the FAQ answer each one needs",
            replies: "SGD banking {}: agent replies, each with the customer message it answers",
        }
        for name, kind, task, source, documents in seeds:
            owner = users["reviewer" if kind == "golden" else "scientist"]
            dataset = Dataset.objects.filter(tenant=tenant, name=name).first()
            if dataset is None:
                dataset = dataset_services.dataset_create(
                    actor=owner,
                    tenant=tenant,
                    name=name,
                    kind=kind,
                    task=task,
                    domain="banking",
                    description=descriptions[task].format(source.name),
                    via="cli",
                )
            if dataset.versions.exists():
                continue
            missing = [p for p in (source, documents) if p is not None and not p.is_file()]
            if missing:
                self.stderr.write(f"skipped {name}: {missing[0]} not found")
                continue
            with tempfile.TemporaryDirectory(dir=settings.UPLOAD_TMP_DIR) as tmp:
                pairs = _staged(source, Path(tmp))
                # The task's columns (a reply corpus's context column is found, "context");
                # banking77 names its label "category".
                text_column, label_column = default_columns(task)
                if task == classification:
                    label_column = "category"
                dataset_services.dataset_version_create(
                    actor=owner,
                    dataset=dataset,
                    path=pairs.path,
                    sha256=pairs.sha256,
                    size_bytes=pairs.size_bytes,
                    filename=pairs.filename,
                    text_column=text_column,
                    label_column=label_column,
                    documents=_staged(documents, Path(tmp)) if documents else None,
                    via="cli",
                )
        self.stdout.write(
            f"demo tenant 'demo' ready; logins (password '{DEMO_PASSWORD}'): "
            + ", ".join(u for u, _ in DEMO_USERS)
        )
