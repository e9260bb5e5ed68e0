"""Routes of the notebooks app, included under the tenant by workbench/api_urls.py and
workbench/dashboard_urls.py."""

from django.urls import path

from apps.notebooks import api, views

api_tenant_patterns = [
    path("notebooks/", api.NotebookListCreateApi.as_view(), name="notebook-list"),
    path("notebooks/<str:notebook_id>/", api.NotebookDetailApi.as_view(), name="notebook-detail"),
    path("data-access/", api.AccessRequestListCreateApi.as_view(), name="access-request-list"),
    path(
        "data-access/<str:request_id>/",
        api.AccessRequestDetailApi.as_view(),
        name="access-request-detail",
    ),
    path(
        "data-access/<str:request_id>/grant",
        api.AccessRequestGrantApi.as_view(),
        name="access-request-grant",
    ),
    path(
        "data-access/<str:request_id>/deny",
        api.AccessRequestDenyApi.as_view(),
        name="access-request-deny",
    ),
    path(
        "data-access/<str:request_id>/revoke",
        api.AccessRequestRevokeApi.as_view(),
        name="access-request-revoke",
    ),
    path("granted-data/", api.GrantedDataListApi.as_view(), name="granted-data-list"),
    path(
        "granted-data/<str:version_id>/download",
        api.GrantedDataDownloadApi.as_view(),
        name="granted-data-download",
    ),
    path(
        "granted-data/<str:version_id>/documents/download",
        api.GrantedDataDocumentsDownloadApi.as_view(),
        name="granted-data-documents-download",
    ),
]

dashboard_tenant_patterns = [
    path("notebooks/", views.notebook_list, name="notebook-list-page"),
    path("notebooks/<str:notebook_id>/stop/", views.notebook_stop, name="notebook-stop-page"),
    path("data-access/", views.access_list, name="access-list-page"),
    path(
        "data-access/<str:request_id>/decide/",
        views.access_decide,
        name="access-decide-page",
    ),
]
