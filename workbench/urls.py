from django.contrib import admin
from django.urls import include, path
from oauth2_provider import urls as oauth2_urls

from apps.core import views as ops
from apps.notebooks.oauth import UserInfoView

urlpatterns = [
    path("healthz", ops.healthz, name="healthz"),
    path("readyz", ops.readyz, name="readyz"),
    path("metrics", ops.metrics_view, name="metrics"),
    path("api/v1/", include(("workbench.api_urls", "api"))),
    path("admin/", admin.site.urls),
    # JupyterHub signs users in here (OAuth 2); no client registration pages are exposed.
    path("oauth/userinfo/", UserInfoView.as_view(), name="oauth-userinfo"),
    path("oauth/", include((oauth2_urls.base_urlpatterns, "oauth2_provider"))),
    path("", include("workbench.dashboard_urls")),
]
