from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from apps.audit.api import AuditEventListApi
from apps.batch import api as batch_api
from apps.campaigns import api as campaigns_api
from apps.core.docs import ApiDocsView
from apps.datasets import api as datasets_api
from apps.deployments import api as deployments_api
from apps.deployments import completion_api
from apps.evaluation import api as evaluation_api
from apps.notebooks.urls import api_tenant_patterns as notebook_patterns
from apps.promotions import api as promotions_api
from apps.registry import api as registry_api
from apps.registry import health_api
from apps.tenants import api as tenants_api
from apps.training import api as training_api

tenant_patterns = [
    path("", tenants_api.TenantDetailApi.as_view(), name="tenant-detail"),
    path("members/", tenants_api.MemberListCreateApi.as_view(), name="member-list"),
    path("batch-predictions/", batch_api.BatchListCreateApi.as_view(), name="batch-list"),
    path(
        "batch-predictions/<str:batch_id>/",
        batch_api.BatchDetailApi.as_view(),
        name="batch-detail",
    ),
    path(
        "batch-predictions/<str:batch_id>/cancel",
        batch_api.BatchCancelApi.as_view(),
        name="batch-cancel",
    ),
    path(
        "batch-predictions/<str:batch_id>/output",
        batch_api.BatchOutputApi.as_view(),
        name="batch-output",
    ),
    path(
        "batch-predictions/<str:batch_id>/register",
        batch_api.BatchRegisterApi.as_view(),
        name="batch-register",
    ),
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
    path(
        "datasets/<str:dataset_id>/versions/<str:version>/documents/download",
        datasets_api.DatasetVersionDocumentsDownloadApi.as_view(),
        name="dataset-version-documents-download",
    ),
    path("audit/", AuditEventListApi.as_view(), name="audit-list"),
    path("runs/", training_api.RunListCreateApi.as_view(), name="run-list"),
    path("runs/<str:run_id>/", training_api.RunDetailApi.as_view(), name="run-detail"),
    path("runs/<str:run_id>/cancel", training_api.RunCancelApi.as_view(), name="run-cancel"),
    path("runs/<str:run_id>/rerun", training_api.RunRerunApi.as_view(), name="run-rerun"),
    path("runs/<str:run_id>/metrics/", training_api.RunMetricsApi.as_view(), name="run-metrics"),
    path("sweeps/", training_api.SweepListCreateApi.as_view(), name="sweep-list"),
    path("sweeps/<str:sweep_id>/", training_api.SweepDetailApi.as_view(), name="sweep-detail"),
    path("evaluations/", evaluation_api.EvaluationListCreateApi.as_view(), name="evaluation-list"),
    path(
        "evaluations/<str:evaluation_id>/",
        evaluation_api.EvaluationDetailApi.as_view(),
        name="evaluation-detail",
    ),
    path(
        "evaluations/<str:evaluation_id>/wrong-queries",
        evaluation_api.EvaluationWrongQueriesApi.as_view(),
        name="evaluation-wrong-queries",
    ),
    path("policies/", evaluation_api.PolicyListApi.as_view(), name="policy-list"),
    path(
        "policies/<str:model_kind>/", evaluation_api.PolicyDetailApi.as_view(), name="policy-detail"
    ),
    path("promotions/", promotions_api.PromotionListCreateApi.as_view(), name="promotion-list"),
    path(
        "promotions/<str:promotion_id>/",
        promotions_api.PromotionDetailApi.as_view(),
        name="promotion-detail",
    ),
    path(
        "promotions/<str:promotion_id>/approve",
        promotions_api.PromotionApproveApi.as_view(),
        name="promotion-approve",
    ),
    path(
        "promotions/<str:promotion_id>/reject",
        promotions_api.PromotionRejectApi.as_view(),
        name="promotion-reject",
    ),
    path("models/", registry_api.ModelListApi.as_view(), name="model-list"),
    path("models/<str:name>/", registry_api.ModelDetailApi.as_view(), name="model-detail"),
    path(
        "models/<str:name>/versions/",
        registry_api.ModelVersionListApi.as_view(),
        name="model-version-list",
    ),
    path(
        "models/<str:name>/versions/<int:number>/",
        registry_api.ModelVersionDetailApi.as_view(),
        name="model-version-detail",
    ),
    path(
        "models/<str:name>/versions/<int:number>/export",
        registry_api.ModelVersionExportApi.as_view(),
        name="model-version-export",
    ),
    path("models/<str:name>/predict", deployments_api.ModelPredictApi.as_view(), name="predict"),
    path("models/<str:name>/embed", deployments_api.ModelEmbedApi.as_view(), name="embed"),
    path("models/<str:name>/search", deployments_api.ModelSearchApi.as_view(), name="search"),
    path("models/<str:name>/complete", completion_api.ModelCompleteApi.as_view(), name="complete"),
    path("deployments/", deployments_api.DeploymentListApi.as_view(), name="deployment-list"),
    path(
        "deployments/<str:deployment_id>/",
        deployments_api.DeploymentDetailApi.as_view(),
        name="deployment-detail",
    ),
    path(
        "deployments/<str:deployment_id>/warmup",
        deployments_api.DeploymentWarmupApi.as_view(),
        name="deployment-warmup",
    ),
    path(
        "deployments/<str:deployment_id>/rollback",
        deployments_api.DeploymentRollbackApi.as_view(),
        name="deployment-rollback",
    ),
    path(
        "deployments/<str:deployment_id>/retire",
        deployments_api.DeploymentRetireApi.as_view(),
        name="deployment-retire",
    ),
    path(
        "deployments/<str:deployment_id>/reindex",
        deployments_api.DeploymentReindexApi.as_view(),
        name="deployment-reindex",
    ),
    *notebook_patterns,
]

urlpatterns = [
    path("tenants/", tenants_api.TenantListCreateApi.as_view(), name="tenant-list"),
    path("tenants/<slug:tenant>/", include(tenant_patterns)),
    path("base-models/", training_api.BaseModelListApi.as_view(), name="base-model-list"),
    path(
        "shared-datasets/",
        datasets_api.SharedDatasetListCreateApi.as_view(),
        name="shared-dataset-list",
    ),
    path(
        "shared-datasets/<str:dataset_id>/versions/",
        datasets_api.SharedDatasetVersionListCreateApi.as_view(),
        name="shared-dataset-version-list",
    ),
    path("fleet/", deployments_api.FleetApi.as_view(), name="fleet"),
    path("model-health/", health_api.ModelHealthApi.as_view(), name="model-health"),
    path("campaigns/", campaigns_api.CampaignListCreateApi.as_view(), name="campaign-list"),
    path(
        "campaigns/<str:campaign_id>/",
        campaigns_api.CampaignDetailApi.as_view(),
        name="campaign-detail",
    ),
    path(
        "campaigns/<str:campaign_id>/items/",
        campaigns_api.CampaignItemListApi.as_view(),
        name="campaign-items",
    ),
    path(
        "campaigns/<str:campaign_id>/cancel",
        campaigns_api.CampaignCancelApi.as_view(),
        name="campaign-cancel",
    ),
    path(
        "campaigns/<str:campaign_id>/approve",
        campaigns_api.CampaignApproveApi.as_view(),
        name="campaign-approve",
    ),
    path(
        "campaigns/<str:campaign_id>/reject",
        campaigns_api.CampaignRejectApi.as_view(),
        name="campaign-reject",
    ),
    path("users/", tenants_api.UserListCreateApi.as_view(), name="user-list"),
    path("users/<str:username>/", tenants_api.UserDetailApi.as_view(), name="user-detail"),
    path(
        "users/<str:username>/org-roles",
        tenants_api.UserOrgRolesApi.as_view(),
        name="user-org-roles",
    ),
    path(
        "users/<str:username>/password-link",
        tenants_api.UserPasswordLinkApi.as_view(),
        name="user-password-link",
    ),
    path("tokens/", tenants_api.TokenListCreateApi.as_view(), name="token-list"),
    path("tokens/<str:token_id>/", tenants_api.TokenDetailApi.as_view(), name="token-detail"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", ApiDocsView.as_view(url_name="api:schema"), name="docs"),
]
