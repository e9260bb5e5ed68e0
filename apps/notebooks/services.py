"""Writes for notebook servers (data-access grants are in grants.py).

``notebook_start`` (starting; the hub spawns it) -> ``notebooks_sync`` sees it running, or
gone (culled, crashed, stopped in the hub) -> ``notebook_stop``. A server's API token
lives exactly as long as the server.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import DomainError, ServiceUnavailable
from apps.datasets.models import DatasetVersion
from apps.notebooks.grants import check_granted
from apps.notebooks.hub import ServerState, get_hub, hub_username
from apps.notebooks.models import (
    ACTIVE,
    NotebookServer,
    NotebookStatus,
)
from apps.tenants.models import Tenant
from apps.tenants.services import token_create, token_revoke

log = logging.getLogger(__name__)

# Tokens made for a notebook carry this name prefix; NotebookTokenLimits keeps them to the
# routes a notebook needs (see permissions.py).
NOTEBOOK_TOKEN_PREFIX = "notebook:"  # noqa: S105 - a name, not a secret
SERVER_NAME_PREFIX = "nb-"


# --- notebook servers -------------------------------------------------------------------


def _server_env(
    server: NotebookServer, secret: str, versions: Sequence[DatasetVersion]
) -> dict[str, str]:
    env = {
        "WORKBENCH_URL": settings.WORKBENCH_URL,
        "WORKBENCH_TOKEN": secret,
        "WORKBENCH_TENANT": server.tenant.slug,
        "WORKBENCH_NOTEBOOK": server.pk,
        "WORKBENCH_DATASETS": ",".join(v.pk for v in versions),
    }
    if settings.NOTEBOOK_MLFLOW_TRACKING_URI:
        env["MLFLOW_TRACKING_URI"] = settings.NOTEBOOK_MLFLOW_TRACKING_URI
    return env


@transaction.atomic
def notebook_start(
    *, actor: Any, tenant: Tenant, datasets: Sequence[DatasetVersion] = (), via: str = ""
) -> NotebookServer:
    """Record the server, issue its token, then ask the hub to spawn it.

    The hub is called last, inside the transaction: if it cannot be reached (503) or
    refuses (409), the row and the token roll back with the request, so a refused start
    leaves neither an orphan server nor an unused token.
    """
    # One start at a time per user, so two concurrent requests cannot both pass the limit.
    get_user_model().objects.select_for_update().filter(pk=actor.pk).first()
    limit = settings.NOTEBOOK_MAX_SERVERS_PER_USER
    running = NotebookServer.objects.filter(user=actor, status__in=ACTIVE).count()
    if running >= limit:
        raise DomainError(
            f"You already have {running} notebook server(s) running, the most allowed per "
            f"user ({limit}); stop one first.",
            code="limit_reached",
        )
    versions = list(dict.fromkeys(datasets))
    check_granted(tenant=tenant, user=actor, versions=versions)
    server = NotebookServer(tenant=tenant, user=actor, hub_user=hub_username(actor))
    server.server_name = SERVER_NAME_PREFIX + server.pk.split("_", 1)[1]
    server.save()
    server.datasets.set(versions)
    issued = token_create(
        user=actor,
        name=f"{NOTEBOOK_TOKEN_PREFIX}{server.pk}",
        tenant=tenant,
        expires_at=timezone.now() + timedelta(seconds=settings.NOTEBOOK_TOKEN_LIFETIME_SECONDS),
        via=via,
    )
    server.token = issued.token
    server.save(update_fields=["token"])
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="notebook.start",
        obj=server,
        after={"server": server.server_name, "datasets": [v.pk for v in versions]},
        via=via,
    )
    hub = get_hub()
    hub.ensure_user(server.hub_user)
    try:
        ready = hub.start(
            user=server.hub_user,
            server=server.server_name,
            display_name=f"{tenant.slug} · {server.pk}",
            user_options={"env": _server_env(server, issued.secret, versions)},
        )
    except ServiceUnavailable:
        # A timeout may hide a spawn that went ahead: stop it, or it would run with a
        # token that is about to roll back.
        _stop_quietly(server)
        raise
    if ready:
        _mark_running(server, None)
    return server


def _stop_quietly(server: NotebookServer) -> None:
    try:
        get_hub().stop(user=server.hub_user, server=server.server_name)
    except (ServiceUnavailable, DomainError):
        log.warning("could not stop server after a failed start", extra={"server": server.pk})


def _mark_running(server: NotebookServer, state: ServerState | None) -> None:
    now = timezone.now()
    server.status = NotebookStatus.RUNNING
    server.url = (state.url if state else "") or f"/user/{server.hub_user}/{server.server_name}/"
    server.ready_at = server.ready_at or now
    server.last_activity = (state.last_activity if state else None) or server.last_activity or now
    server.save(update_fields=["status", "url", "ready_at", "last_activity"])


def _end(server: NotebookServer, *, status: NotebookStatus, reason: str, error: str = "") -> None:
    """Mark a server ended and revoke its token (both inside the caller's transaction)."""
    before = {"status": server.status}
    server.status = status
    server.stop_reason = reason
    server.error = error
    server.stopped_at = timezone.now()
    server.save(update_fields=["status", "stop_reason", "error", "stopped_at"])
    if server.token is not None:
        token_revoke(actor=None, token=server.token, via="notebook")
    audit_record(
        actor=None,
        tenant=server.tenant,
        verb="notebook.end" if status == NotebookStatus.STOPPED else "notebook.fail",
        obj=server,
        before=before,
        after={"status": status.value, "reason": reason},
        via="hub",
    )


@transaction.atomic
def notebook_stop(*, actor: Any, server: NotebookServer, via: str = "") -> NotebookServer:
    """Stop the server in the hub, then revoke its token. Stopping a stopped one is a no-op;
    with the hub down nothing changes (503) and the server keeps running."""
    locked = (
        NotebookServer.objects.select_for_update(of=("self",))
        .select_related("token")
        .get(pk=server.pk)
    )
    if not locked.active:
        return locked
    get_hub().stop(user=locked.hub_user, server=locked.server_name)
    before = {"status": locked.status}
    locked.status = NotebookStatus.STOPPED
    locked.stop_reason = "stopped"
    locked.stopped_at = timezone.now()
    locked.save(update_fields=["status", "stop_reason", "stopped_at"])
    if locked.token is not None:
        token_revoke(actor=actor, token=locked.token, via=via)
    audit_record(
        actor=actor,
        tenant=locked.tenant,
        verb="notebook.stop",
        obj=locked,
        before=before,
        after={"status": locked.status},
        via=via,
    )
    return locked


def notebooks_sync(*, user: Any = None) -> int:
    """Bring active rows in line with the hub: running once ready, ended (token revoked)
    once the hub no longer runs them, whoever stopped them (the idle culler, the maximum
    age, a crash, the user in the hub). Returns how many rows changed. A hub that does not
    answer changes nothing."""
    active = NotebookServer.objects.filter(status__in=ACTIVE)
    if user is not None:
        active = active.filter(user=user)
    by_hub_user: dict[str, list[str]] = defaultdict(list)
    for pk, hub_user in active.values_list("pk", "hub_user"):
        by_hub_user[hub_user].append(pk)
    hub = get_hub()
    changed = 0
    if user is None:
        # The full sweep also visits users with no active row, for orphans (see below).
        try:
            for name in hub.active_users():
                by_hub_user.setdefault(name, [])
        except ServiceUnavailable:
            return changed
    for hub_user, pks in by_hub_user.items():
        try:
            states = hub.servers(hub_user)
        except ServiceUnavailable:
            return changed
        for pk in pks:
            changed += _sync_one(pk, states)
        _stop_orphans(hub_user, states)
    return changed


# A start commits its row right after the hub accepted the spawn; a server this old with
# no active row behind it was left by a start whose commit failed.
ORPHAN_AFTER = timedelta(minutes=2)


def _stop_orphans(hub_user: str, states: dict[str, ServerState]) -> None:
    ours = [name for name in states if name.startswith(SERVER_NAME_PREFIX)]
    active = set(
        NotebookServer.objects.filter(server_name__in=ours, status__in=ACTIVE).values_list(
            "server_name", flat=True
        )
    )
    cutoff = timezone.now() - ORPHAN_AFTER
    for name in ours:
        started = states[name].started
        if name not in active and started is not None and started < cutoff:
            log.warning("stopping orphan notebook server", extra={"server": name})
            with contextlib.suppress(ServiceUnavailable, DomainError):
                get_hub().stop(user=hub_user, server=name)


@transaction.atomic
def _sync_one(pk: str, states: dict[str, ServerState]) -> int:
    server = (
        NotebookServer.objects.select_for_update(of=("self",))
        .select_related("token", "tenant")
        .get(pk=pk)
    )
    if not server.active:
        return 0
    state = states.get(server.server_name)
    if state is not None and state.ready:
        if server.status == NotebookStatus.RUNNING and state.last_activity == server.last_activity:
            return 0
        _mark_running(server, state)
        return 1
    if state is not None and state.pending:
        return 0  # still spawning (or stopping)
    if server.status == NotebookStatus.STARTING:
        # The hub gave up on the spawn; remove what it kept of it.
        _stop_quietly(server)
        _end(
            server,
            status=NotebookStatus.FAILED,
            reason="spawn_failed",
            error="The server did not start; JupyterHub's log says why.",
        )
    else:
        _end(server, status=NotebookStatus.STOPPED, reason="ended_in_hub")
    return 1


# --- single sign-on ---------------------------------------------------------------------


@transaction.atomic
def hub_oauth_client_ensure(*, client_id: str, client_secret: str, redirect_uri: str) -> Any:
    """Register (or update) JupyterHub as a trusted OAuth client of the workbench.

    Trusted: users are not asked to approve it (skip_authorization); the secret is stored
    hashed. Safe to run at every start of the hub.
    """
    from oauth2_provider.models import Application

    if not client_secret:
        raise DomainError(
            "JUPYTERHUB_OAUTH_CLIENT_SECRET is empty: the hub cannot sign users in.",
            code="not_configured",
        )
    app = Application.objects.select_for_update().filter(client_id=client_id).first()
    created = app is None
    if app is None:
        app = Application(client_id=client_id)
    app.name = "JupyterHub"
    app.client_type = Application.CLIENT_CONFIDENTIAL
    app.authorization_grant_type = Application.GRANT_AUTHORIZATION_CODE
    app.redirect_uris = redirect_uri
    app.client_secret = client_secret
    app.hash_client_secret = True
    app.skip_authorization = True
    app.save()
    audit_record(
        actor=None,
        tenant=None,
        verb="oauth_client.create" if created else "oauth_client.update",
        obj=app,
        after={"client_id": client_id, "redirect_uri": redirect_uri},
        via="command",
    )
    return app
