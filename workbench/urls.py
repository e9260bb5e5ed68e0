from django.contrib import admin
from django.urls import include, path

from apps.core import views as ops

urlpatterns = [
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics_view, name="metrics"),
    path("api/v1/", include(("workbench.api_urls", "api"))),
    path("admin/", admin.site.urls),
    path("", include("workbench.dashboard_urls")),
]
