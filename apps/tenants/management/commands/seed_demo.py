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
from apps.datasets.models import Dataset
from apps.tenants import services
from apps.tenants.models import Membership, Role, Tenant

DEMO_USERS = [("scientist", Role.SCIENTIST), ("reviewer", Role.REVIEWER), ("admin", Role.ADMIN)]
DEMO_PASSWORD = "workbench-demo"  # noqa: S105 - a local demo login, printed on purpose


def _default_data_dir() -> Path:
    return Path(settings.BASE_DIR).parent / "shared" / "datasets" / "banking77"


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
        # The golden set is the reviewer's: golden and sample sets decide promotions, so only
        # reviewers and admins create and change them.
        seeds = [
            ("banking77-train", "training", "train.csv", users["scientist"]),
            ("banking77-golden", "golden", "test.csv", users["reviewer"]),
        ]
        for name, kind, filename, owner in seeds:
            source = data_dir / filename
            dataset = Dataset.objects.filter(tenant=tenant, name=name).first()
            if dataset is None:
                dataset = dataset_services.dataset_create(
                    actor=owner,
                    tenant=tenant,
                    name=name,
                    kind=kind,
                    task="text-classification",
                    domain="banking",
                    description=f"banking77 {filename}: customer-support queries, 77 intents",
                    via="cli",
                )
            if dataset.versions.exists():
                continue
            if not source.is_file():
                self.stderr.write(f"skipped {name}: {source} not found")
                continue
            with tempfile.TemporaryDirectory(dir=settings.UPLOAD_TMP_DIR) as tmp:
                copy = Path(tmp) / filename
                shutil.copyfile(source, copy)
                data = copy.read_bytes()
                dataset_services.dataset_version_create(
                    actor=owner,
                    dataset=dataset,
                    path=copy,
                    sha256=hashlib.sha256(data).hexdigest(),
                    size_bytes=len(data),
                    filename=filename,
                    text_column="text",
                    label_column="category",
                    via="cli",
                )
        self.stdout.write(
            f"demo tenant 'demo' ready; logins (password '{DEMO_PASSWORD}'): "
            + ", ".join(u for u, _ in DEMO_USERS)
        )
