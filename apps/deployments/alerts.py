"""Fleet alerts: a failed warm-up, a replica that keeps restarting, a model that keeps
failing to load, a model not being served. The fleet controller resolves each once its
condition clears (audited). Each is e-mailed to the tenant's admins, audited, and counted on
``/metrics`` (``workbench_fleet_open_alerts``) until resolved."""

from __future__ import annotations

from collections.abc import Iterator

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from apps.audit.services import audit_record
from apps.deployments.models import AlertKind, Deployment, DeploymentStatus, FleetAlert, FleetLease
from apps.tenants.models import Membership, Role, Tenant


def alert_raise(
    *, tenant: Tenant, deployment: Deployment | None, kind: str, message: str
) -> FleetAlert:
    """Open an alert, unless the same one is already open (one e-mail per incident)."""
    with transaction.atomic():
        open_alert = (
            FleetAlert.objects.select_for_update()
            .filter(tenant=tenant, deployment=deployment, kind=kind, resolved_at__isnull=True)
            .first()
        )
        if open_alert is not None:
            return open_alert
        alert = FleetAlert.objects.create(
            tenant=tenant, deployment=deployment, kind=kind, message=message[:4000]
        )
        audit_record(
            actor=None,
            tenant=tenant,
            verb="alert.raised",
            obj=alert,
            after={"kind": kind, "message": message[:1000], "deployment": alert.deployment_id},
            via="task",
        )
        transaction.on_commit(lambda: _email_admins(alert))
    return alert


def alerts_resolve(*, deployment: Deployment, kind: str) -> int:
    with transaction.atomic():
        open_alerts = list(
            FleetAlert.objects.select_for_update().filter(
                deployment=deployment, kind=kind, resolved_at__isnull=True
            )
        )
        for alert in open_alerts:
            alert.resolved_at = timezone.now()
            alert.save(update_fields=["resolved_at"])
            audit_record(
                actor=None,
                tenant=alert.tenant,
                verb="alert.resolved",
                obj=alert,
                after={"kind": kind},
                via="task",
            )
    return len(open_alerts)


def _email_admins(alert: FleetAlert) -> None:
    admins = Membership.objects.filter(tenant=alert.tenant, role=Role.ADMIN).select_related("user")
    emails = sorted({m.user.email for m in admins if m.user.email})
    if emails:
        send_mail(
            f"[workbench] {AlertKind(alert.kind).label}: {alert.tenant.slug}",
            f"{alert.message}\n\nAlert {alert.pk}, raised {alert.created_at:%Y-%m-%d %H:%M} UTC.",
            settings.DEFAULT_FROM_EMAIL,
            emails,
            fail_silently=True,
        )


class OpenAlertsCollector(Collector):
    """Open alerts by kind, read from the database at scrape time (so every web process
    reports the same number, with no multiprocess bookkeeping)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "workbench_fleet_open_alerts", "Open fleet alerts, by kind.", labels=["kind"]
        )
        try:
            counts = dict(
                FleetAlert.objects.filter(resolved_at__isnull=True)
                .values_list("kind")
                .annotate(n=Count("id"))
                .values_list("kind", "n")
            )
        except Exception:  # /metrics must answer while the database does not
            return
        for kind in AlertKind.values:
            gauge.add_metric([kind], counts.get(kind, 0))
        yield gauge
        yield from self._deployments()

    def _deployments(self) -> Iterator[GaugeMetricFamily]:
        """Deployments by status (``degraded`` > 0: a model is not being served), and
        whether a fleet controller holds a fresh lease."""
        try:
            by_status = dict(
                Deployment.objects.values_list("status")
                .annotate(n=Count("id"))
                .values_list("status", "n")
            )
            lease = FleetLease.objects.filter(pk="fleet").first()
        except Exception:
            return
        deployments = GaugeMetricFamily(
            "workbench_deployments", "Deployments, by status.", labels=["status"]
        )
        for status in DeploymentStatus.values:
            deployments.add_metric([status], by_status.get(status, 0))
        yield deployments
        now = timezone.now()
        up = GaugeMetricFamily(
            "workbench_fleet_controller_up", "1 while a fleet controller holds a fresh lease."
        )
        up.add_metric([], 1.0 if lease and lease.expires_at and lease.expires_at > now else 0.0)
        yield up
