"""Loading a packed tenant model into a replica: verification, safety, prediction parity."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.worker.conftest import LABELS, write_slice
from tests.worker.serving.models import PackedModel
from worker.inference import load_classifier
from worker.serving import loading
from worker.serving.specs import ModelLoadError


def sample_texts(tmp_path: Path) -> list[str]:
    """Real banking77 texts of every label, plus an empty-ish and an over-long one."""
    import csv

    path = write_slice(tmp_path / "texts.csv", LABELS, 4)
    with path.open(encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)]
    return [*texts, "?", "my card " * 300]


def test_predictions_equal_the_reference_classifier(
    tenant_models: list[PackedModel], tmp_path: Path
) -> None:
    texts = sample_texts(tmp_path)
    for packed in tenant_models:
        loaded = loading.load_model(packed.tar.as_uri(), packed.sha256, device="cpu")
        reference = load_classifier(packed.model_dir, device="cpu").predict(texts)
        fast = loaded.classifier.predict(texts)
        assert [p["label"] for p in fast] == [p["label"] for p in reference]
        for mine, theirs in zip(fast, reference, strict=True):
            assert mine["score"] == pytest.approx(theirs["score"], rel=1e-5, abs=1e-6)
        assert loaded.artifact_bytes == packed.size
        assert loaded.classifier.weight_bytes > 100_000
    # The perturbed tenants really differ from the trained one (else parity proves little).
    labels = [
        [p["label"] for p in load_classifier(m.model_dir).predict(texts)] for m in tenant_models
    ]
    assert labels[0] != labels[1] or labels[0] != labels[2]
    assert len(set(labels[0])) > 1


def test_models_of_one_architecture_do_not_share_weights(tenant_models: list[PackedModel]) -> None:
    first = loading.load_model(tenant_models[0].tar.as_uri(), tenant_models[0].sha256)
    second = loading.load_model(tenant_models[1].tar.as_uri(), tenant_models[1].sha256)
    narrow = loading.load_model(tenant_models[3].tar.as_uri(), tenant_models[3].sha256)
    a = dict(first.classifier.model.named_parameters())
    b = dict(second.classifier.model.named_parameters())
    assert a["classifier.weight"].data_ptr() != b["classifier.weight"].data_ptr()
    assert not a["classifier.weight"].equal(b["classifier.weight"])
    assert dict(narrow.classifier.model.named_parameters())["classifier.weight"].shape[0] == 4
    assert narrow.classifier.labels == LABELS[:4]
    # Constant buffers are shared with the architecture's template, not copied per model.
    buffers_a = dict(first.classifier.model.named_buffers())
    buffers_b = dict(second.classifier.model.named_buffers())
    for name, buffer in buffers_a.items():
        assert buffer.data_ptr() == buffers_b[name].data_ptr()


def test_sha256_mismatch_is_refused(tenant_models: list[PackedModel]) -> None:
    packed = tenant_models[0]
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        loading.load_model(packed.tar.as_uri(), "0" * 64)


def test_unreadable_and_unsupported_artifacts(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read artifact"):
        loading.fetch_bytes((tmp_path / "missing.tar").as_uri())
    with pytest.raises(ModelLoadError, match="unsupported artifact URI"):
        loading.fetch_bytes("http://example.com/model.tar")
    with pytest.raises(ModelLoadError, match="not a readable tar"):
        loading.build_classifier(b"not a tar at all" * 100, device="cpu")


def tar_bytes(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in members:
            data = contents.get(info.name)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../escape.json", tarfile.REGTYPE, "unsafe path"),
        ("/etc/passwd", tarfile.REGTYPE, "unsafe path"),
        ("config.json", tarfile.SYMTYPE, "not a regular file"),
    ],
)
def test_unsafe_members_are_refused(name: str, kind: bytes, message: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    data = tar_bytes([info], {} if kind == tarfile.SYMTYPE else {name: b"{}"})
    with pytest.raises(ModelLoadError, match=message):
        loading.read_members(data, loading.REQUIRED_MEMBERS)


def test_missing_files_and_bad_weights(tenant_models: list[PackedModel]) -> None:
    data = tenant_models[0].tar.read_bytes()
    members = loading.read_members(data, loading.REQUIRED_MEMBERS, loading.OPTIONAL_MEMBERS)
    without_weights = {k: v for k, v in members.items() if k != loading.WEIGHTS_FILE}
    infos = [tarfile.TarInfo(name) for name in without_weights]
    with pytest.raises(ModelLoadError, match=r"artifact lacks model\.safetensors"):
        loading.build_classifier(tar_bytes(infos, without_weights), device="cpu")
    garbled = {**members, loading.WEIGHTS_FILE: b"\x00" * 64}
    infos = [tarfile.TarInfo(name) for name in garbled]
    with pytest.raises(ModelLoadError, match="unreadable model files"):
        loading.build_classifier(tar_bytes(infos, garbled), device="cpu")


def test_s3_artifacts_are_read_with_boto3_mocked_by_moto(
    tenant_models: list[PackedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    loading._s3_client.cache_clear()
    packed = tenant_models[0]
    try:
        with mock_aws():
            boto3.client("s3").create_bucket(Bucket="models")
            boto3.client("s3").put_object(
                Bucket="models", Key="t/acme/model.tar", Body=packed.tar.read_bytes()
            )
            loaded = loading.load_model("s3://models/t/acme/model.tar", packed.sha256)
            assert loaded.artifact_bytes == packed.size
            with pytest.raises(ModelLoadError, match="cannot read artifact"):
                loading.fetch_bytes("s3://models/t/acme/absent.tar")
    finally:
        loading._s3_client.cache_clear()
