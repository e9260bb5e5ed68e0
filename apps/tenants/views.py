from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from apps.tenants.selectors import memberships_for_user


@login_required
def home(request: HttpRequest) -> HttpResponse:
    first = memberships_for_user(user=request.user).first()
    if first is None:
        return render(request, "tenants/no_tenant.html")
    return redirect("dataset-list-page", tenant=first.tenant.slug)
