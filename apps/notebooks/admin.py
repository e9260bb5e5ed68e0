"""Read-only admin views: every change goes through the services (and the audit log)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.notebooks.models import DataAccessRequest, NotebookServer


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NotebookServer)
class NotebookServerAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "user", "server_name", "status", "created_at", "stopped_at"]
    list_filter = ["status"]


@admin.register(DataAccessRequest)
class DataAccessRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "dataset", "requested_by", "status", "decided_by"]
    list_filter = ["status"]
