from django.contrib.auth import views as auth_views
from django.urls import include, path

from apps.audit import views as audit_views
from apps.batch import views as batch_views
from apps.campaigns import views as campaign_views
from apps.datasets import views as dataset_views
from apps.deployments import completion_views
from apps.deployments import views as deployment_views
from apps.evaluation import views as evaluation_views
from apps.notebooks.urls import dashboard_tenant_patterns as notebook_pages
from apps.promotions import views as promotion_views
from apps.registry import views as registry_views
from apps.tenants import views as tenant_views
from apps.training import views as training_views

# Pages inside one tenant: /t/<slug>/... (the tenant is resolved per request, 404 for others).
tenant_patterns = [
    path("datasets/", dataset_views.dataset_list, name="dataset-list-page"),
    path("datasets/<str:dataset_id>/", dataset_views.dataset_detail, name="dataset-detail-page"),
    path(
        "datasets/<str:dataset_id>/versions/",
        dataset_views.dataset_upload,
        name="dataset-upload-page",
    ),
    path(
        "datasets/<str:dataset_id>/delete/",
        dataset_views.dataset_delete,
        name="dataset-delete-page",
    ),
    path("runs/", training_views.run_list, name="run-list-page"),
    path("batch-predictions/", batch_views.batch_list, name="batch-list-page"),
    path(
        "batch-predictions/<str:batch_id>/",
        batch_views.batch_detail,
        name="batch-detail-page",
    ),
    path(
        "batch-predictions/<str:batch_id>/cancel/",
        batch_views.batch_cancel,
        name="batch-cancel-page",
    ),
    path(
        "batch-predictions/<str:batch_id>/register/",
        batch_views.batch_register,
        name="batch-register-page",
    ),
    # Before runs/<run_id>/, which would otherwise take "compare" for a run id.
    path("runs/compare/", training_views.run_compare, name="run-compare-page"),
    path("runs/<str:run_id>/", training_views.run_detail, name="run-detail-page"),
    path("runs/<str:run_id>/cancel/", training_views.run_cancel, name="run-cancel-page"),
    path("runs/<str:run_id>/rerun/", training_views.run_rerun, name="run-rerun-page"),
    path("models/", registry_views.model_list, name="model-list-page"),
    path("models/<str:name>/", registry_views.model_detail, name="model-detail-page"),
    path("members/", tenant_views.members_page, name="members-page"),
    path("members/<str:username>/role/", tenant_views.member_change_role, name="member-role-page"),
    path("members/<str:username>/remove/", tenant_views.member_remove, name="member-remove-page"),
    path("audit/", audit_views.audit_page, name="audit-page"),
    path("reviews/", promotion_views.review_queue, name="review-queue-page"),
    path("reviews/<str:promotion_id>/", promotion_views.review_detail, name="review-detail-page"),
    path(
        "reviews/<str:promotion_id>/approve/",
        promotion_views.review_approve,
        name="review-approve-page",
    ),
    path(
        "reviews/<str:promotion_id>/reject/",
        promotion_views.review_reject,
        name="review-reject-page",
    ),
    path("policies/", evaluation_views.policies_page, name="policies-page"),
    path("deployments/", deployment_views.deployment_list, name="deployment-list-page"),
    path(
        "deployments/<str:deployment_id>/",
        deployment_views.deployment_detail,
        name="deployment-detail-page",
    ),
    path(
        "deployments/<str:deployment_id>/complete/",
        completion_views.deployment_complete,
        name="deployment-complete-page",
    ),
    path(
        "deployments/<str:deployment_id>/warmup/",
        deployment_views.deployment_warmup,
        name="deployment-warmup-page",
    ),
    path(
        "deployments/<str:deployment_id>/rollback/",
        deployment_views.deployment_rollback,
        name="deployment-rollback-page",
    ),
    path(
        "deployments/<str:deployment_id>/retire/",
        deployment_views.deployment_retire,
        name="deployment-retire-page",
    ),
    *notebook_pages,
]

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tokens/", tenant_views.tokens_page, name="tokens-page"),
    path("tenants/", tenant_views.my_tenants_page, name="my-tenants-page"),
    path("tokens/<str:token_id>/revoke/", tenant_views.token_revoke, name="token-revoke-page"),
    path("fleet/", deployment_views.fleet_page, name="fleet-page"),
    # Staff: onboarding customers (tenants with their first admins, user accounts).
    path("staff/tenants/", tenant_views.tenants_page, name="tenants-page"),
    path("staff/users/", tenant_views.users_page, name="users-page"),
    path("staff/campaigns/", campaign_views.campaigns_page, name="campaigns-page"),
    path("staff/model-health/", registry_views.model_health_page, name="model-health-page"),
    path("staff/campaigns/<str:campaign_id>/", campaign_views.campaign_page, name="campaign-page"),
    path(
        "staff/campaigns/<str:campaign_id>/cancel/",
        campaign_views.campaign_cancel,
        name="campaign-cancel-page",
    ),
    path(
        "staff/campaigns/<str:campaign_id>/decide/",
        campaign_views.campaign_decide,
        name="campaign-decide-page",
    ),
    path(
        "staff/users/<str:username>/active/",
        tenant_views.user_set_active,
        name="user-active-page",
    ),
    path(
        "staff/users/<str:username>/org-roles/",
        tenant_views.user_org_roles,
        name="user-org-roles-page",
    ),
    path(
        "staff/users/<str:username>/password-link/",
        tenant_views.user_password_link,
        name="user-password-link-page",
    ),
    # The one-time link a new user follows to choose a password.
    path(
        "password/set/<uidb64>/<token>/",
        tenant_views.PasswordSetView.as_view(),
        name="password-set-page",
    ),
    path("password/set/done/", tenant_views.password_set_done, name="password-set-done-page"),
    path("t/<slug:tenant>/", include(tenant_patterns)),
    path("", tenant_views.home, name="home"),
]
