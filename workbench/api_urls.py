from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.audit.api import AuditEventListApi
from apps.datasets import api as datasets_api
from apps.tenants import api as tenants_api

tenant_patterns = [
    path("", tenants_api.TenantDetailApi.as_view(), name="tenant-detail"),
    path("members/", tenants_api.MemberListCreateApi.as_view(), name="member-list"),
    path("members/<str:username>/", tenants_api.MemberDetailApi.as_view(), name="member-detail"),
    path("datasets/", datasets_api.DatasetListCreateApi.as_view(), name="dataset-list"),
    path(
        "datasets/<str:dataset_id>/", datasets_api.DatasetDetailApi.as_view(), name="dataset-detail"
    ),
    path(
        "datasets/<str:dataset_id>/versions/",
        datasets_api.DatasetVersionListCreateApi.as_view(),
        name="dataset-version-list",
    ),
    path(
        "datasets/<str:dataset_id>/versions/<str:version>/",
        datasets_api.DatasetVersionDetailApi.as_view(),
        name="dataset-version-detail",
    ),
    path(
        "datasets/<str:dataset_id>/versions/<str:version>/download",
        datasets_api.DatasetVersionDownloadApi.as_view(),
        name="dataset-version-download",
    ),
    path("audit/", AuditEventListApi.as_view(), name="audit-list"),
]

urlpatterns = [
    path("tenants/", tenants_api.TenantListCreateApi.as_view(), name="tenant-list"),
    path("tenants/<slug:tenant>/", include(tenant_patterns)),
    path("tokens/", tenants_api.TokenListCreateApi.as_view(), name="token-list"),
    path("tokens/<str:token_id>/", tenants_api.TokenDetailApi.as_view(), name="token-detail"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
