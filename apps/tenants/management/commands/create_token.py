from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.tenants import services
from apps.tenants.models import Tenant


class Command(BaseCommand):
    help = "Print a new API token for USERNAME (automation's way in without the browser)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--tenant", help="slug of the one tenant the token may reach")
        parser.add_argument("--expires-days", type=int, help="days until the token expires")
        parser.add_argument("--name", default="cli", help="a name to recognise the token by")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"No user named '{options['username']}'.")
        tenant = None
        if options["tenant"]:
            tenant = Tenant.objects.filter(slug=options["tenant"], memberships__user=user).first()
            if tenant is None:
                raise CommandError(
                    f"'{user.get_username()}' is not a member of a tenant '{options['tenant']}'."
                )
        expires_at = None
        if options["expires_days"] is not None:
            if options["expires_days"] < 1:
                raise CommandError("--expires-days must be at least 1.")
            expires_at = timezone.now() + timedelta(days=options["expires_days"])
        issued = services.token_create(
            user=user, name=options["name"], tenant=tenant, expires_at=expires_at, via="cli"
        )
        self.stdout.write(issued.secret)
