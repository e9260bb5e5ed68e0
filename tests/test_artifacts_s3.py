"""The S3 artifact store against a real S3 API server on loopback.

AWS S3 cannot run here, so moto's server mode stands in for it: a real HTTP server speaking
the S3 REST API, reached by boto3 over a socket exactly as MinIO or AWS would be. Nothing
in the store is mocked; only the far end of the connection is a stand-in.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from django.core.files.uploadedfile import SimpleUploadedFile
from moto.server import ThreadedMotoServer

from apps.core import artifacts
from apps.core.artifacts import S3ArtifactStore, store_from_url
from apps.datasets.models import Dataset
from tests.conftest import Actor

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_s3_stand_in_for_aws() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on a free loopback port (stands in for AWS S3)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, and nothing from the machine's own AWS setup leaking in."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SECURITY_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3(moto_s3_stand_in_for_aws: str, aws_env: None) -> Any:
    """A raw boto3 client on the moto stand-in, to see what the store really wrote."""
    return boto3.client("s3", endpoint_url=moto_s3_stand_in_for_aws, region_name=REGION)


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh bucket per test, so objects can be counted exactly."""
    name = f"wb-{uuid.uuid4().hex[:20]}"
    s3.create_bucket(Bucket=name)
    return name


def object_keys(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_s3_store_round_trip_against_moto_s3_stand_in(
    moto_s3_stand_in_for_aws: str, bucket: str, s3: Any, tmp_path: Path
) -> None:
    store = store_from_url(f"s3://{bucket}/artifacts", moto_s3_stand_in_for_aws)
    assert isinstance(store, S3ArtifactStore)
    assert store.url == f"s3://{bucket}/artifacts"
    store.ping()

    # Over boto3's 8 MiB multipart threshold and not a whole number of read chunks.
    data = os.urandom(9 * 1024 * 1024 + 12_345)
    source = write(tmp_path / "model.safetensors", data)
    key = "models/acme/m1/weights.safetensors"

    assert not store.exists(key)
    store.put_file(key, source)
    assert source.exists(), "put_file without move keeps the source"
    assert store.exists(key)
    assert store.size(key) == len(data)
    with store.open(key) as fh:
        assert fh.read() == data
    chunks = list(store.iter_bytes(key))
    assert len(chunks) > 1
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == hashlib.sha256(data).hexdigest()

    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting what is gone is not an error
    assert object_keys(s3, bucket) == []


def test_s3_put_file_with_move_removes_the_local_copy_against_moto_s3_stand_in(
    moto_s3_stand_in_for_aws: str, bucket: str, tmp_path: Path
) -> None:
    store = store_from_url(f"s3://{bucket}", moto_s3_stand_in_for_aws)
    source = write(tmp_path / "upload.csv", b"text,label\nhi,greet\n")
    store.put_file("datasets/t/d/abc", source, move=True)
    assert not source.exists()
    assert b"".join(store.iter_bytes("datasets/t/d/abc")) == b"text,label\nhi,greet\n"


def test_s3_ping_fails_for_a_missing_bucket_against_moto_s3_stand_in(
    moto_s3_stand_in_for_aws: str, aws_env: None
) -> None:
    store = store_from_url("s3://no-such-bucket-here/artifacts", moto_s3_stand_in_for_aws)
    with pytest.raises(ClientError):
        store.ping()


def test_s3_store_applies_its_prefix_against_moto_s3_stand_in(
    moto_s3_stand_in_for_aws: str, bucket: str, s3: Any, tmp_path: Path
) -> None:
    source = write(tmp_path / "blob", b"payload")
    # Slashes around the prefix are not part of it.
    prefixed = store_from_url(f"s3://{bucket}/team/artifacts/", moto_s3_stand_in_for_aws)
    prefixed.put_file("datasets/1/ds_x/abc123", source)
    bare = store_from_url(f"s3://{bucket}", moto_s3_stand_in_for_aws)
    bare.put_file("top-level/key", source)

    assert object_keys(s3, bucket) == ["team/artifacts/datasets/1/ds_x/abc123", "top-level/key"]
    body = s3.get_object(Bucket=bucket, Key="team/artifacts/datasets/1/ds_x/abc123")["Body"].read()
    assert body == b"payload"
    # Each store sees only its own namespace.
    assert prefixed.exists("datasets/1/ds_x/abc123")
    assert not bare.exists("datasets/1/ds_x/abc123")
    assert not prefixed.exists("top-level/key")


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "datasets/../../etc/passwd",
        "datasets/..",
        "/etc/passwd",
        "/datasets/x",
        "datasets//x",
        "",
        "datasets/x/",
        "a\\..\\b",
        "datasets/x y",
    ],
)
def test_s3_store_refuses_unsafe_keys_against_moto_s3_stand_in(
    moto_s3_stand_in_for_aws: str, bucket: str, s3: Any, tmp_path: Path, key: str
) -> None:
    store = store_from_url(f"s3://{bucket}/artifacts", moto_s3_stand_in_for_aws)
    source = write(tmp_path / "blob", b"payload")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.put_file(key, source)
    for method in (store.open, store.size, store.exists, store.delete):
        with pytest.raises(ValueError, match="invalid artifact key"):
            method(key)
    with pytest.raises(ValueError, match="invalid artifact key"):
        list(store.iter_bytes(key))
    assert object_keys(s3, bucket) == []


# --- end to end through the API, with settings.ARTIFACT_STORE on the stand-in ---------------

CSV = (
    b"text,label\n"
    b"I am still waiting on my card?,card_arrival\n"
    b"My card has not arrived after 2 weeks,card_arrival\n"
    b"How do I top up with a bank transfer?,top_up\n"
    b"Can I top up by card?,top_up\n"
)


@pytest.fixture
def s3_artifact_store(settings: Any, moto_s3_stand_in_for_aws: str, bucket: str) -> Iterator[str]:
    """Point the workbench's ARTIFACT_STORE at the moto bucket (stand-in for AWS S3)."""
    settings.ARTIFACT_STORE = f"s3://{bucket}/artifacts"
    settings.AWS_ENDPOINT_URL = moto_s3_stand_in_for_aws
    artifacts._cached.cache_clear()
    yield bucket
    artifacts._cached.cache_clear()


def post_version(actor: Actor, dataset_id: str, filename: str, content: bytes) -> Any:
    return actor.client.post(
        f"/api/v1/tenants/acme/datasets/{dataset_id}/versions/",
        {"file": SimpleUploadedFile(filename, content)},
    )


def test_dataset_upload_and_download_through_moto_s3_stand_in(
    scientist: Actor, training_dataset: str, s3_artifact_store: str, s3: Any
) -> None:
    assert isinstance(artifacts.get_store(), S3ArtifactStore)
    response = post_version(scientist, training_dataset, "intents.csv", CSV)
    assert response.status_code == 201, response.content
    body = response.json()
    sha256 = hashlib.sha256(CSV).hexdigest()
    assert body["sha256"] == sha256
    assert body["size_bytes"] == len(CSV)

    tenant_id = Dataset.objects.get(pk=training_dataset).tenant_id
    key = f"artifacts/datasets/{tenant_id}/{training_dataset}/{sha256}"
    assert object_keys(s3, s3_artifact_store) == [key]
    assert s3.get_object(Bucket=s3_artifact_store, Key=key)["Body"].read() == CSV

    download = scientist.client.get(
        f"/api/v1/tenants/acme/datasets/{training_dataset}/versions/{body['number']}/download"
    )
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == CSV
    assert download["X-Content-SHA256"] == sha256
    assert download["Content-Length"] == str(len(CSV))


def test_same_bytes_again_store_no_second_object_in_moto_s3_stand_in(
    scientist: Actor, training_dataset: str, s3_artifact_store: str, s3: Any
) -> None:
    assert post_version(scientist, training_dataset, "intents.csv", CSV).status_code == 201
    again = post_version(scientist, training_dataset, "copy.csv", CSV)
    assert again.status_code == 200, again.content
    assert len(object_keys(s3, s3_artifact_store)) == 1


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("wrong-columns.csv", b"sentence,intent\nhello,greet\nbye,leave\n"),
        ("one-label.csv", b"text,label\nhello,greet\nhi there,greet\n"),
        ("binary.csv", b"text,label\n\x00\x01\x02,greet\n"),
    ],
)
def test_invalid_upload_leaves_no_object_in_moto_s3_stand_in(
    scientist: Actor,
    training_dataset: str,
    s3_artifact_store: str,
    s3: Any,
    filename: str,
    content: bytes,
) -> None:
    response = post_version(scientist, training_dataset, filename, content)
    assert response.status_code == 400, response.content
    assert object_keys(s3, s3_artifact_store) == []
