"""List endpoints answer in a fixed number of queries, however many rows they list."""

from __future__ import annotations

import pytest

from apps.datasets import services as dataset_services
from apps.tenants.models import Role
from tests.conftest import make_actor

pytestmark = pytest.mark.django_db


@pytest.fixture
def many_datasets(tenant, scientist):
    for i in range(30):
        dataset_services.dataset_create(
            actor=scientist.user,
            tenant=tenant,
            name=f"set-{i}",
            kind="training",
            task="text-classification",
        )


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tenants/acme/datasets/",
        "/api/v1/tenants/acme/audit/",
        "/api/v1/tenants/acme/members/",
        "/api/v1/tenants/",
        "/api/v1/tokens/",
    ],
)
def test_list_endpoints_use_a_constant_number_of_queries(
    path, many_datasets, scientist, tenant, django_assert_max_num_queries
):
    for i in range(10):
        make_actor(f"member{i}", tenant, Role.VIEWER)
    # auth (token + last-used update) + tenant access + count + page: at most 6, never per row
    with django_assert_max_num_queries(6):
        response = scientist.api("get", path)
    assert response.status_code == 200
    assert response.json()["count"] >= 1
