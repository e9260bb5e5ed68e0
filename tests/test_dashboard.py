"""The server-rendered dashboard: pages, tenant isolation, roles, forms and uploads.

Every request goes through Django's test client against the real views, services and
upload handler; nothing is mocked except the one "dataset in use" refusal, which needs
models (training runs) that do not exist yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils.html import escape

from apps.audit.models import AuditEvent
from apps.core.errors import DomainError
from apps.datasets import services as dataset_services
from apps.datasets.charts import label_chart
from apps.datasets.models import Dataset, DatasetVersion
from apps.tenants import services as tenant_services
from apps.tenants.models import ApiToken, Membership, Role, Tenant
from tests.conftest import BANKING77, Actor, stored_files

TRAIN_CSV = BANKING77 / "train.csv"
SMALL_CSV = b"text,label\nhello there,greeting\nbye now,farewell\nhi again,greeting\n"


def login(client: Client, actor: Actor) -> Client:
    client.force_login(actor.user)
    return client


def make_dataset(
    actor: Actor,
    tenant: Tenant,
    name: str = "support-intents",
    kind: str = "training",
    domain: str = "banking",
) -> Dataset:
    return dataset_services.dataset_create(
        actor=actor.user,
        tenant=tenant,
        name=name,
        kind=kind,
        task="text-classification",
        domain=domain,
    )


def detail_url(dataset: Dataset, slug: str = "acme") -> str:
    return f"/t/{slug}/datasets/{dataset.pk}/"


def upload_url(dataset: Dataset, slug: str = "acme") -> str:
    return f"/t/{slug}/datasets/{dataset.pk}/versions/"


def post_upload(
    client: Client, dataset: Dataset, filename: str, content: bytes, **fields: Any
) -> Any:
    data = {"file": SimpleUploadedFile(filename, content, content_type="text/csv"), **fields}
    return client.post(upload_url(dataset), data)


def bars(html: str) -> int:
    chart = re.search(r'<svg id="label-chart".*?</svg>', html, re.S)
    assert chart is not None, "no #label-chart on the page"
    return len(re.findall(r'<rect class="bar"', chart.group(0)))


def role_message(role: str, have: str, slug: str = "acme") -> str:
    return escape(
        f"This action needs the '{role}' role (or higher) in tenant '{slug}'; you have '{have}'."
    )


@pytest.fixture
def dataset(scientist: Actor, tenant: Tenant) -> Dataset:
    return make_dataset(scientist, tenant)


@pytest.fixture
def uploads_dir(artifacts_dir: Path, settings: Any, tmp_path: Path) -> Path:
    """A private directory for the upload handler's temporary files, to see that none stay."""
    path = Path(settings.UPLOAD_TMP_DIR)
    if tmp_path not in path.parents:  # artifacts_dir did not make a private one
        path = tmp_path / "upload-tmp"
        path.mkdir()
        settings.UPLOAD_TMP_DIR = path
    return path


# --- pages render, for members only -------------------------------------------------------


def test_anonymous_user_is_sent_to_login(client: Client, tenant: Tenant) -> None:
    response = client.get("/t/acme/datasets/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/t/acme/datasets/")
    page = client.get("/login/")
    assert page.status_code == 200
    assert b'name="username"' in page.content and b"csrfmiddlewaretoken" in page.content


def test_login_form_signs_in_and_lands_on_datasets(client: Client, viewer: Actor) -> None:
    from tests.conftest import PASSWORD

    response = client.post("/login/", {"username": "vic", "password": PASSWORD}, follow=True)
    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == "/t/acme/datasets/"


@pytest.mark.parametrize("who", ["viewer", "scientist", "reviewer", "admin"])
def test_every_page_renders_for_a_member(
    client: Client, request: pytest.FixtureRequest, dataset: Dataset, who: str
) -> None:
    actor: Actor = request.getfixturevalue(who)
    login(client, actor)
    home = client.get("/")
    assert home.status_code == 302 and home["Location"] == "/t/acme/datasets/"
    for url in [
        "/t/acme/datasets/",
        detail_url(dataset),
        "/t/acme/members/",
        "/t/acme/audit/",
        "/tokens/",
    ]:
        response = client.get(url)
        assert response.status_code == 200, url
        html = response.content.decode()
        assert "Workbench" in html and actor.user.username in html
        assert 'action="/logout/"' in html and "csrfmiddlewaretoken" in html
        assert 'href="/api/v1/docs/"' in html


def test_user_without_tenant_sees_no_tenant_page(client: Client, staff: Actor) -> None:
    login(client, staff)
    response = client.get("/")
    assert response.status_code == 200
    assert b"No tenant yet" in response.content


def test_switcher_lists_my_tenants_and_highlights_the_current(
    client: Client, admin: Actor, tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant_services.membership_add(
        actor=None, tenant=other_tenant, user=admin.user, role=Role.VIEWER
    )
    login(client, admin)
    html = client.get("/t/globex/audit/").content.decode()
    assert 'href="/t/acme/audit/"' in html  # switching keeps the section
    current = re.search(r'<a href="/t/globex/audit/" class="current" aria-current="true">', html)
    assert current is not None
    assert 'href="/t/acme/audit/" class="current"' not in html


def test_logout_needs_a_post(client: Client, viewer: Actor) -> None:
    login(client, viewer)
    response = client.post("/logout/")
    assert response.status_code == 302
    assert client.get("/t/acme/datasets/").status_code == 302  # back to the login page


# --- tenant isolation: 404, never 403 -----------------------------------------------------


def test_outsider_gets_404_on_every_page_of_another_tenant(
    client: Client, outsider: Actor, dataset: Dataset, admin: Actor
) -> None:
    login(client, outsider)
    gets = [
        "/t/acme/datasets/",
        detail_url(dataset),
        f"{detail_url(dataset)}delete/",
        "/t/acme/members/",
        "/t/acme/audit/",
        "/t/nope/datasets/",
    ]
    for url in gets:
        assert client.get(url).status_code == 404, url
    posts: list[tuple[str, dict[str, Any]]] = [
        (
            "/t/acme/datasets/",
            {"name": "stolen", "kind": "training", "task": "text-classification"},
        ),
        (upload_url(dataset), {"file": SimpleUploadedFile("a.csv", SMALL_CSV)}),
        (f"{detail_url(dataset)}delete/", {}),
        ("/t/acme/members/", {"username": "otto", "role": "admin"}),
        ("/t/acme/members/ada/role/", {"role": "viewer"}),
        ("/t/acme/members/ada/remove/", {}),
    ]
    for url, data in posts:
        response = client.post(url, data)
        assert response.status_code == 404, url
        assert b"not yours to see" in response.content
    assert Dataset.objects.filter(tenant__slug="acme").count() == 1
    assert not DatasetVersion.objects.exists()
    assert Membership.objects.filter(tenant__slug="acme", user=admin.user, role="admin").exists()


def test_dataset_of_another_tenant_is_404_inside_my_tenant(
    client: Client, outsider: Actor, other_tenant: Tenant, viewer: Actor
) -> None:
    theirs = make_dataset(outsider, other_tenant, name="secret")
    login(client, viewer)
    assert client.get(f"/t/acme/datasets/{theirs.pk}/").status_code == 404


# --- datasets list -------------------------------------------------------------------------


def test_scientist_creates_a_dataset_through_the_form(
    client: Client, scientist: Actor, tenant: Tenant
) -> None:
    login(client, scientist)
    page = client.get("/t/acme/datasets/")
    assert b'id="dataset-create-form"' in page.content
    response = client.post(
        "/t/acme/datasets/",
        {
            "name": "support-intents",
            "kind": "training",
            "task": "text-classification",
            "domain": "banking",
            "description": "Inbound support chats",
        },
    )
    created = Dataset.objects.get(tenant=tenant, name="support-intents")
    assert response.status_code == 302
    assert response["Location"] == detail_url(created)
    event = AuditEvent.objects.get(verb="dataset.create", object_id=created.pk)
    assert event.via == "session" and event.actor_name == "sam"
    follow = client.get(response["Location"])
    assert b"created." in follow.content  # the success message


def test_duplicate_or_invalid_dataset_name_is_a_form_error(
    client: Client, scientist: Actor, dataset: Dataset
) -> None:
    login(client, scientist)
    response = client.post(
        "/t/acme/datasets/",
        {"name": "support-intents", "kind": "training", "task": "text-classification"},
    )
    assert response.status_code == 400
    assert b"already exists in this tenant" in response.content
    response = client.post(
        "/t/acme/datasets/", {"name": "../etc", "kind": "nope", "task": "text-classification"}
    )
    assert response.status_code == 400
    assert b"Use letters, digits" in response.content
    assert b"Select a valid choice" in response.content
    assert Dataset.objects.count() == 1


def test_viewer_sees_no_create_form_and_is_refused_with_the_role(
    client: Client, viewer: Actor, tenant: Tenant
) -> None:
    login(client, viewer)
    page = client.get("/t/acme/datasets/")
    assert page.status_code == 200
    assert b'id="dataset-create-form"' not in page.content
    response = client.post(
        "/t/acme/datasets/", {"name": "mine", "kind": "training", "task": "text-classification"}
    )
    assert response.status_code == 403
    assert role_message("scientist", "viewer") in response.content.decode()
    assert not Dataset.objects.exists()


def test_only_reviewers_and_admins_create_and_change_golden_sets_in_the_dashboard(
    client: Client, scientist: Actor, reviewer: Actor, tenant: Tenant, uploads_dir: Path
) -> None:
    login(client, scientist)
    create = {"name": "yardstick", "kind": "golden", "task": "text-classification"}
    refused = client.post("/t/acme/datasets/", create)
    assert refused.status_code == 403
    assert role_message("reviewer", "scientist") in refused.content.decode()
    assert not Dataset.objects.exists()
    login(client, reviewer)
    assert client.post("/t/acme/datasets/", create).status_code == 302
    golden = Dataset.objects.get(tenant=tenant, name="yardstick")
    login(client, scientist)
    page = client.get(detail_url(golden))
    assert page.status_code == 200
    assert b'id="upload-form"' not in page.content and b"Delete" not in page.content
    assert post_upload(client, golden, "g.csv", SMALL_CSV).status_code == 403
    assert not DatasetVersion.objects.exists() and list(uploads_dir.iterdir()) == []
    assert client.post(f"{detail_url(golden)}delete/").status_code == 403
    assert Dataset.objects.filter(pk=golden.pk).exists()
    login(client, reviewer)
    assert b'id="upload-form"' in client.get(detail_url(golden)).content
    assert post_upload(client, golden, "g.csv", SMALL_CSV).status_code == 302
    assert DatasetVersion.objects.filter(dataset=golden).count() == 1


def test_datasets_list_filters_with_the_api_filterset_and_paginates(
    client: Client, scientist: Actor, tenant: Tenant, django_assert_max_num_queries: Any
) -> None:
    for i in range(27):
        make_dataset(scientist, tenant, name=f"train-{i:02d}", domain="banking")
    for i in range(3):
        make_dataset(scientist, tenant, name=f"gold-{i}", kind="golden", domain="retail")
    login(client, scientist)
    with django_assert_max_num_queries(12):  # no query per row
        first = client.get("/t/acme/datasets/").content.decode()
    assert first.count('<tr>\n      <td><a href="/t/acme/datasets/') == 25
    assert "Page 1 of 2 · 30 datasets" in first
    second = client.get("/t/acme/datasets/?page=2").content.decode()
    assert second.count('<tr>\n      <td><a href="/t/acme/datasets/') == 5
    golden = client.get("/t/acme/datasets/?kind=golden").content.decode()
    assert golden.count("gold-") == 3 and "train-00" not in golden
    assert "gold-1" in client.get("/t/acme/datasets/?q=gold-1").content.decode()
    retail = client.get("/t/acme/datasets/?domain=retail&kind=training").content.decode()
    assert "No dataset matches these filters." in retail
    bad = client.get("/t/acme/datasets/?kind=bogus")
    assert bad.status_code == 200 and b"Select a valid choice" in bad.content


# --- uploads and the detail page -----------------------------------------------------------


def test_uploading_banking77_shows_77_bars_and_the_row_count(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path, uploads_dir: Path
) -> None:
    login(client, scientist)
    page = client.get(detail_url(dataset))
    assert b'id="upload-form"' in page.content and b'enctype="multipart/form-data"' in page.content
    with TRAIN_CSV.open("rb") as fh:
        response = client.post(
            upload_url(dataset),
            {"file": fh, "text_column": "text", "label_column": "category", "format": ""},
        )
    assert response.status_code == 302, response.content[:2000]
    assert response["Location"] == f"{detail_url(dataset)}?v=1#main"
    version = DatasetVersion.objects.get(dataset=dataset)
    assert (version.rows, version.label_count, version.label_column) == (10003, 77, "category")
    assert len(stored_files(artifacts_dir)) == 1
    assert list(uploads_dir.iterdir()) == []  # the temporary upload is gone

    html = client.get(response["Location"]).content.decode()
    assert bars(html) == 77
    assert 'data-rows="10003"' in html and "10,003" in html
    assert "Version 1 stored: 10,003 rows, 77 labels." in html
    download = f'href="/api/v1/tenants/acme/datasets/{dataset.pk}/versions/1/download"'
    assert download in html
    assert version.sha256[:12] in html
    assert "I am still waiting on my card?" in html  # the preview
    # Bars are sorted by count: the first drawn is the most frequent label.
    counts = [int(c) for c in re.findall(r'<rect class="bar"[^>]*data-count="(\d+)"', html)]
    assert counts == sorted(counts, reverse=True) and sum(counts) == 10003
    # The download link takes the session.
    got = client.get(f"/api/v1/tenants/acme/datasets/{dataset.pk}/versions/1/download")
    assert got.status_code == 200 and got["X-Content-SHA256"] == version.sha256


def test_uploading_the_same_bytes_again_keeps_one_version(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path
) -> None:
    login(client, scientist)
    assert post_upload(client, dataset, "a.csv", SMALL_CSV).status_code == 302
    again = post_upload(client, dataset, "a.csv", SMALL_CSV)
    assert again["Location"].endswith("?v=1#main")
    assert DatasetVersion.objects.filter(dataset=dataset).count() == 1
    assert b"identical to version 1" in client.get(again["Location"]).content


def test_version_selection_by_query_parameter(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path
) -> None:
    login(client, scientist)
    post_upload(client, dataset, "a.csv", SMALL_CSV)
    post_upload(client, dataset, "b.csv", SMALL_CSV + b"see you,farewell\nyo,greeting\n")
    latest = client.get(detail_url(dataset)).content.decode()
    assert "<h2>Version 2</h2>" in latest and 'data-rows="5"' in latest
    first = client.get(f"{detail_url(dataset)}?v=1").content.decode()
    assert "<h2>Version 1</h2>" in first and 'data-rows="3"' in first and bars(first) == 2
    assert client.get(f"{detail_url(dataset)}?v=9").status_code == 404


def test_missing_label_column_is_shown_inline_and_stores_nothing(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path, uploads_dir: Path
) -> None:
    login(client, scientist)
    content = TRAIN_CSV.read_bytes()[:5000].rsplit(b"\n", 1)[0] + b"\n"
    response = post_upload(
        client, dataset, "train.csv", content, text_column="text", label_column="label"
    )
    assert response.status_code == 400
    html = response.content.decode()
    error = re.search(
        r'<div class="form-error" id="upload-error" role="alert">(.*?)</div>\s*</div>'
        r'|<div class="form-error" id="upload-error" role="alert">(.*?)</div>',
        html,
        re.S,
    )
    assert error is not None
    assert escape("missing the label column 'label'") in html
    assert escape("'text', 'category'") in html  # the columns the file does have
    assert 'id="upload-form"' in html and 'value="label"' in html  # the form is shown again
    assert not DatasetVersion.objects.exists()
    assert stored_files(artifacts_dir) == []
    assert list(uploads_dir.iterdir()) == []


def test_empty_text_on_line_3_is_named_inline(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path
) -> None:
    login(client, scientist)
    response = post_upload(client, dataset, "bad.csv", b"text,label\nhello,a\n,b\nbye,b\n")
    assert response.status_code == 400
    html = response.content.decode()
    assert 'id="upload-error"' in html
    assert escape("line 3: the text ('text') is empty") in html
    assert "Fix line 3 of the file" in html
    assert not DatasetVersion.objects.exists()


def test_missing_file_is_a_form_error(client: Client, scientist: Actor, dataset: Dataset) -> None:
    login(client, scientist)
    response = client.post(upload_url(dataset), {"label_column": "category"})
    assert response.status_code == 400
    assert b"This field is required." in response.content


def test_upload_over_the_size_limit_is_shown_inline_as_413(
    client: Client,
    scientist: Actor,
    dataset: Dataset,
    settings: Any,
    artifacts_dir: Path,
    uploads_dir: Path,
) -> None:
    settings.DATASET_MAX_UPLOAD_BYTES = 1000
    login(client, scientist)
    response = post_upload(client, dataset, "big.csv", b"text,label\n" + b"word,a\n" * 500)
    assert response.status_code == 413
    html = response.content.decode()
    assert 'id="upload-error"' in html
    assert "larger than the upload limit of 1,000 bytes" in html
    assert not DatasetVersion.objects.exists()
    assert list(uploads_dir.iterdir()) == []


def test_viewer_sees_no_upload_form_and_is_refused_with_the_role(
    client: Client, viewer: Actor, dataset: Dataset, artifacts_dir: Path, uploads_dir: Path
) -> None:
    login(client, viewer)
    page = client.get(detail_url(dataset))
    assert page.status_code == 200
    assert b'id="upload-form"' not in page.content and b"Delete" not in page.content
    response = post_upload(client, dataset, "a.csv", SMALL_CSV)
    assert response.status_code == 403
    assert role_message("scientist", "viewer") in response.content.decode()
    assert not DatasetVersion.objects.exists()
    assert list(uploads_dir.iterdir()) == []
    assert client.get(f"{detail_url(dataset)}delete/").status_code == 403
    assert client.post(f"{detail_url(dataset)}delete/").status_code == 403
    assert Dataset.objects.filter(pk=dataset.pk).exists()


def test_upload_checks_csrf_after_parsing_the_body(
    scientist: Actor, dataset: Dataset, artifacts_dir: Path, uploads_dir: Path
) -> None:
    browser = Client(enforce_csrf_checks=True)
    login(browser, scientist)
    refused = post_upload(browser, dataset, "a.csv", SMALL_CSV)
    assert refused.status_code == 403 and b"CSRF" in refused.content
    assert not DatasetVersion.objects.exists()
    assert list(uploads_dir.iterdir()) == []

    browser.get(detail_url(dataset))  # sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    accepted = post_upload(browser, dataset, "a.csv", SMALL_CSV, csrfmiddlewaretoken=token)
    assert accepted.status_code == 302
    assert DatasetVersion.objects.filter(dataset=dataset).count() == 1


# --- delete --------------------------------------------------------------------------------


def test_delete_asks_first_then_deletes(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path
) -> None:
    login(client, scientist)
    post_upload(client, dataset, "a.csv", SMALL_CSV)
    confirm = client.get(f"{detail_url(dataset)}delete/")
    assert confirm.status_code == 200 and b'id="delete-form"' in confirm.content
    assert Dataset.objects.filter(pk=dataset.pk).exists()  # a GET never deletes
    response = client.post(f"{detail_url(dataset)}delete/")
    assert response.status_code == 302 and response["Location"] == "/t/acme/datasets/"
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
    assert AuditEvent.objects.filter(verb="dataset.delete", object_id=dataset.pk).exists()
    assert b"deleted." in client.get("/t/acme/datasets/").content


def test_delete_of_a_dataset_in_use_shows_the_conflict(
    client: Client, scientist: Actor, dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing can reference a version yet (training runs come later), so the refusal the
    # service raises for a protected version is simulated here.
    def refuse(**kwargs: Any) -> None:
        raise DomainError(
            "This dataset cannot be deleted: its versions are used by run r_1", code="in_use"
        )

    monkeypatch.setattr(dataset_services, "dataset_delete", refuse)
    login(client, scientist)
    response = client.post(f"{detail_url(dataset)}delete/", follow=True)
    assert response.redirect_chain[-1][0] == detail_url(dataset)
    assert b"message-error" in response.content
    assert b"its versions are used by run r_1" in response.content
    assert Dataset.objects.filter(pk=dataset.pk).exists()


# --- members -------------------------------------------------------------------------------


def test_members_page_lists_everyone_with_roles(
    client: Client, viewer: Actor, admin: Actor, scientist: Actor
) -> None:
    login(client, viewer)
    html = client.get("/t/acme/members/").content.decode()
    for name in ("ada", "sam", "vic"):
        assert f'data-username="{name}"' in html
    assert "member-add-form" not in html and "Change role" not in html


def test_admin_adds_changes_and_removes_a_member(
    client: Client, admin: Actor, tenant: Tenant, staff: Actor
) -> None:
    login(client, admin)
    page = client.get("/t/acme/members/")
    assert b'id="member-add-form"' in page.content
    added = client.post("/t/acme/members/", {"username": "stella", "role": "viewer"}, follow=True)
    assert b"Added &#x27;stella&#x27; as viewer." in added.content
    membership = Membership.objects.get(tenant=tenant, user=staff.user)
    assert membership.role == "viewer"

    client.post("/t/acme/members/stella/role/", {"role": "reviewer"})
    membership.refresh_from_db()
    assert membership.role == "reviewer"

    removed = client.post("/t/acme/members/stella/remove/", follow=True)
    assert b"Removed &#x27;stella&#x27;" in removed.content
    assert not Membership.objects.filter(tenant=tenant, user=staff.user).exists()
    verbs = set(
        AuditEvent.objects.filter(tenant=tenant, via="session").values_list("verb", flat=True)
    )
    assert {"member.add", "member.change_role", "member.remove"} <= verbs


def test_unknown_username_is_a_form_error_and_duplicates_a_message(
    client: Client, admin: Actor, scientist: Actor
) -> None:
    login(client, admin)
    response = client.post("/t/acme/members/", {"username": "nobody", "role": "viewer"})
    assert response.status_code == 400
    assert escape("No active user named 'nobody'.") in response.content.decode()
    again = client.post("/t/acme/members/", {"username": "sam", "role": "viewer"}, follow=True)
    assert b"message-error" in again.content and b"already a member" in again.content


def test_last_admin_cannot_be_demoted_or_removed(
    client: Client, admin: Actor, tenant: Tenant
) -> None:
    login(client, admin)
    demoted = client.post("/t/acme/members/ada/role/", {"role": "viewer"}, follow=True)
    assert b"at least one admin" in demoted.content
    removed = client.post("/t/acme/members/ada/remove/", follow=True)
    assert b"at least one admin" in removed.content
    assert Membership.objects.get(tenant=tenant, user=admin.user).role == "admin"


def test_scientist_cannot_manage_members(
    client: Client, scientist: Actor, viewer: Actor, staff: Actor, tenant: Tenant
) -> None:
    login(client, scientist)
    expected = role_message("admin", "scientist")
    for url, data in [
        ("/t/acme/members/", {"username": "stella", "role": "admin"}),
        ("/t/acme/members/vic/role/", {"role": "admin"}),
        ("/t/acme/members/vic/remove/", {}),
    ]:
        response = client.post(url, data)
        assert response.status_code == 403, url
        assert expected in response.content.decode()
    assert Membership.objects.get(tenant=tenant, user=viewer.user).role == "viewer"
    assert not Membership.objects.filter(user=staff.user).exists()


def test_unknown_member_is_404(client: Client, admin: Actor) -> None:
    login(client, admin)
    assert client.post("/t/acme/members/nobody/role/", {"role": "viewer"}).status_code == 404
    assert client.post("/t/acme/members/otto/remove/").status_code == 404


# --- audit ---------------------------------------------------------------------------------


def test_audit_page_lists_events_and_filters_by_verb(
    client: Client,
    admin: Actor,
    scientist: Actor,
    dataset: Dataset,
    django_assert_max_num_queries: Any,
) -> None:
    login(client, admin)
    with django_assert_max_num_queries(12):
        response = client.get("/t/acme/audit/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "dataset.create" in html and "member.add" in html
    assert escape('{"description":"","domain":"banking"') in html  # compact after-state JSON
    filtered = client.get("/t/acme/audit/?verb=dataset.create").content.decode()
    assert filtered.count('<code class="verb">') == 1
    assert '<code class="verb">member.add</code>' not in filtered
    by_actor = client.get("/t/acme/audit/?actor=sam").content.decode()
    assert '<code class="verb">dataset.create</code>' in by_actor
    future = client.get("/t/acme/audit/?since=2999-01-01").content.decode()
    assert "No events match these filters." in future
    bad = client.get("/t/acme/audit/?since=yesterday")
    assert bad.status_code == 200 and b"Enter a valid date/time." in bad.content


def test_audit_page_paginates_by_50(
    client: Client, admin: Actor, scientist: Actor, tenant: Tenant
) -> None:
    for i in range(55):
        make_dataset(scientist, tenant, name=f"d{i}")
    login(client, admin)
    html = client.get("/t/acme/audit/?verb=dataset.create").content.decode()
    assert html.count('<code class="verb">') == 50
    assert "55 events" in html and 'rel="prev"' not in html
    # The log pages by position (a cursor), keeping the filters.
    older = re.search(r'href="(\?verb=dataset.create&amp;cursor=[^"]+)" rel="next"', html)
    assert older is not None
    second = client.get("/t/acme/audit/" + older.group(1).replace("&amp;", "&")).content.decode()
    assert second.count('<code class="verb">') == 5
    assert 'rel="next"' not in second and 'rel="prev"' in second
    # The five are the oldest: d0..d4, none of the first page's again.
    first_ids = set(re.findall(r'<code class="small">(ds_\w+)</code>', html))
    second_ids = set(re.findall(r'<code class="small">(ds_\w+)</code>', second))
    assert len(first_ids) == 50 and len(second_ids) == 5 and not first_ids & second_ids
    # A number still opens a page (within the first 10,000 events); a bad cursor the newest.
    assert client.get("/t/acme/audit/?page=2").status_code == 200
    broken = client.get("/t/acme/audit/?cursor=nonsense").content.decode()
    assert broken.count('<code class="verb">') == 50


def test_audit_page_shows_only_my_tenant(
    client: Client, admin: Actor, outsider: Actor, other_tenant: Tenant
) -> None:
    make_dataset(outsider, other_tenant, name="globex-secret")
    login(client, admin)
    assert b"globex-secret" not in client.get("/t/acme/audit/").content


# --- API tokens ----------------------------------------------------------------------------


def test_token_created_in_the_dashboard_works_until_revoked(
    client: Client, scientist: Actor, tenant: Tenant
) -> None:
    login(client, scientist)
    response = client.post(
        "/tokens/", {"name": "laptop", "tenant": "acme", "expires_in_days": "30"}
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    secret = re.search(r'<code id="token-secret">(wb_[^<]+)</code>', response.content.decode())
    assert secret is not None
    token = ApiToken.objects.get(user=scientist.user, name="laptop")
    assert token.tenant == tenant and token.expires_at is not None

    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret.group(1)}")
    listed = api.get("/api/v1/tenants/")
    assert listed.status_code == 200
    assert [t["slug"] for t in listed.json()["results"]] == ["acme"]

    listing = client.get("/tokens/").content.decode()
    assert "laptop" in listing and secret.group(1) not in listing  # the secret is shown once
    revoked = client.post(f"/tokens/{token.pk}/revoke/", follow=True)
    assert b"revoked" in revoked.content
    assert api.get("/api/v1/tenants/").status_code == 401


def test_token_form_refuses_another_tenant_and_bad_expiry(
    client: Client, scientist: Actor, other_tenant: Tenant
) -> None:
    login(client, scientist)
    response = client.post("/tokens/", {"name": "x", "tenant": "globex", "expires_in_days": "0"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "Select a valid choice" in html
    assert "greater than or equal to 1" in html
    assert "globex" not in html  # another tenant is not even offered
    assert not ApiToken.objects.filter(name="x").exists()


def test_nobody_revokes_another_users_token(
    client: Client, scientist: Actor, viewer: Actor
) -> None:
    theirs = ApiToken.objects.get(user=viewer.user)
    login(client, scientist)
    assert client.post(f"/tokens/{theirs.pk}/revoke/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# --- the chart itself ----------------------------------------------------------------------


def test_label_chart_sorts_by_count_and_scales_to_the_largest() -> None:
    chart = label_chart({"b": 5, "a": 10, "c": 5, "d": 1})
    assert [bar.label for bar in chart.bars] == ["a", "b", "c", "d"]
    assert chart.bars[0].width == chart.bar_area
    assert chart.bars[1].width == pytest.approx(chart.bar_area / 2, abs=0.1)
    assert chart.bars[0].y < chart.bars[1].y
    assert chart.total == 21 and chart.imbalance == 10
    assert label_chart({}).bars == []


def test_labels_are_escaped_in_the_chart(
    client: Client, scientist: Actor, dataset: Dataset, artifacts_dir: Path
) -> None:
    login(client, scientist)
    evil = b'text,label\nhi,"<script>alert(1)</script>"\nyo,plain\n'
    assert post_upload(client, dataset, "x.csv", evil).status_code == 302
    html = client.get(detail_url(dataset)).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert bars(html) == 2
