"""SageMakerFleet driving SageMaker multi-model endpoints, with moto standing in for AWS.

AWS cannot run here, so moto's server mode stands in for S3, SageMaker and SageMaker
Runtime: a separate process on loopback, reached by boto3 over HTTP exactly as AWS would
be. It is the only stand-in. The models are real: two tiny BERTs trained here on banking77
slices and packed as the workbench packs them.

Moto runs no inference container. Its ``invoke_endpoint`` answers from a queue of canned
results (``/moto-api/static/sagemaker/endpoint-results``), taking the next one for each new
(endpoint, headers, body) and repeating it for the same request. Each test queues, in the
order the requests are made, what the real model predicts for those inputs (computed here
with :class:`worker.inference.Classifier`). Moto's request recorder shows what the fleet sent.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import pytest

from apps.training.packaging import pack_dir
from tests.conftest import free_port
from tests.worker.conftest import LABELS, Recorder, tiny_config, write_slice
from worker.inference import Classifier, Prediction
from worker.serving.sagemaker import InvalidResponse, SageMakerFleet, endpoint_name
from worker.serving.specs import InsufficientCapacity, ModelLoadError, ModelSpec, PoolSpec
from worker.training.config import DataSpec
from worker.training.loop import train

REGION = "us-east-1"
BUCKET = "wb-serving"
SOURCE_BUCKET = "wb-artifacts"
ROLE = "arn:aws:iam::123456789012:role/workbench-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/workbench-mme:1"
ENDPOINT = "wb-test-classifier"
WARMUP = ["hello, is my card on its way?"]
TEXTS = [
    "How old do I need to be to open an account?",
    "Can I add my card to Apple Pay?",
    "I want to change my PIN",
    "My phone was stolen",
]


@dataclass
class MotoServer:
    """The moto server process, its control API and its request recording."""

    url: str
    recording: Path

    def _post(self, path: str, payload: Any = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        request = urllib.request.Request(
            self.url + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def reset(self) -> None:
        """Forget every resource, queued result and recorded request: a fresh AWS."""
        self._post("/moto-api/reset")
        self.forget_requests()

    def forget_requests(self) -> None:
        self._post("/moto-api/recorder/reset-recording")

    def queue_invocation_results(self, *predictions: list[Prediction]) -> None:
        """Queue one canned invoke_endpoint answer per prediction list, in this order."""
        results = [
            {
                "Body": json.dumps({"outputs": outputs}),
                "ContentType": "application/json",
                "InvokedProductionVariant": "AllTraffic",
            }
            for outputs in predictions
        ]
        self._post("/moto-api/static/sagemaker/endpoint-results", {"results": results})

    def requests(self) -> list[dict[str, Any]]:
        """Every request recorded since the last reset: method, path, headers, body bytes."""
        recorded = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            raw = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
            recorded.append(
                {
                    "method": entry["method"],
                    "path": urlparse(entry["url"]).path,
                    "headers": {k.lower(): v for k, v in entry["headers"].items()},
                    "body": raw,
                }
            )
        return recorded

    def sagemaker_actions(self) -> list[str]:
        """The SageMaker control-plane actions called, e.g. ``CreateModel``."""
        targets = [r["headers"].get("x-amz-target", "") for r in self.requests()]
        return [t.split(".", 1)[1] for t in targets if t.startswith("SageMaker.")]

    def invocations(self) -> list[tuple[str, str, Any]]:
        """(path, TargetModel header, JSON body) of every invoke_endpoint call."""
        return [
            (r["path"], r["headers"].get("x-amzn-sagemaker-target-model"), json.loads(r["body"]))
            for r in self.requests()
            if r["path"].endswith("/invocations")
        ]


@pytest.fixture(scope="module")
def moto_aws_stand_in(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server process on a free loopback port, recording every request."""
    tmp = tmp_path_factory.mktemp("moto")
    port = free_port()
    env = {
        **os.environ,
        "MOTO_ENABLE_RECORDING": "1",
        "MOTO_RECORDER_FILEPATH": str(tmp / "recording.jsonl"),
    }
    with (tmp / "moto.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = MotoServer(url=f"http://127.0.0.1:{port}", recording=tmp / "recording.jsonl")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.reset()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((tmp / "moto.log").read_text()) from None
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def aws(moto_aws_stand_in: MotoServer) -> MotoServer:
    """A fresh stand-in AWS with the endpoints' and the artifacts' buckets."""
    moto_aws_stand_in.reset()
    s3 = client("s3", moto_aws_stand_in)
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket=SOURCE_BUCKET)
    moto_aws_stand_in.forget_requests()
    return moto_aws_stand_in


@functools.cache
def session() -> boto3.Session:
    # Explicit fake credentials: nothing from the machine's own AWS setup is read. One
    # session for the module: each new one loads the service models again (~0.7 s).
    return boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )


def client(service: str, server: MotoServer) -> Any:
    return session().client(service, endpoint_url=server.url)


def make_fleet(server: MotoServer, **overrides: Any) -> SageMakerFleet:
    return SageMakerFleet(
        region=REGION,
        bucket=BUCKET,
        prefix="endpoints",
        role_arn=ROLE,
        image_uri=IMAGE,
        instance_type="ml.m5.large",
        endpoint_prefix="wb-test",
        session=session(),
        endpoint_url=server.url,
        warmup_texts=WARMUP,
        **overrides,
    )


@dataclass(frozen=True)
class Trained:
    """A trained tiny BERT: its packed tar, the tar's sha256 and the loaded classifier."""

    model_id: str
    tar: Path
    sha256: str
    size: int
    classifier: Classifier

    def spec(self, uri: str | None = None, **overrides: Any) -> ModelSpec:
        values: dict[str, Any] = {
            "model_id": self.model_id,
            "artifact_uri": uri or self.tar.as_uri(),
            "sha256": self.sha256,
            "memory_bytes": self.size,
        }
        return ModelSpec(**(values | overrides))


def train_and_pack(model_id: str, labels: list[str], tmp: Path) -> Trained:
    data = DataSpec(
        path=write_slice(tmp / "slice.csv", labels, 20),
        text_column="text",
        label_column="category",
        format="csv",
    )
    result = train(
        tiny_config(epochs=2),
        data,
        validation_data=None,
        work_dir=tmp / "run",
        callbacks=Recorder(),
    )
    tar = tmp / f"{model_id}.tar"
    sha256, size = pack_dir(result.model_dir, tar)
    return Trained(model_id, tar, sha256, size, Classifier(result.model_dir, device="cpu"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trained, Trained]:
    """Two real models on disjoint halves of the labels, so their answers tell them apart."""
    first = train_and_pack("mv_first", LABELS[:4], tmp_path_factory.mktemp("first"))
    second = train_and_pack("mv_second", LABELS[4:], tmp_path_factory.mktemp("second"))
    return first, second


def object_keys(s3: Any, bucket: str = BUCKET) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def archive_key(model: Trained) -> str:
    return f"endpoints/classifier/{model.model_id}.tar.gz"


MANIFEST = "endpoints/classifier.manifest.json"


def assert_nothing_created(server: MotoServer) -> None:
    s3 = client("s3", server)
    sagemaker = client("sagemaker", server)
    assert object_keys(s3) == []
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []
    assert sagemaker.list_endpoints()["Endpoints"] == []


# --- names ---------------------------------------------------------------------------------


def test_endpoint_names_are_deterministic_valid_sagemaker_names() -> None:
    assert endpoint_name("wb-test", "classifier") == ENDPOINT
    assert endpoint_name("wb-test", "classifier") == endpoint_name("wb-test", "classifier")
    assert endpoint_name("wb", "text_embedding") == "wb-text-embedding"
    with pytest.raises(ValueError, match="invalid pool kind"):
        endpoint_name("wb", "../classifier")
    with pytest.raises(ValueError, match="not a valid SageMaker endpoint name"):
        endpoint_name("wb_bad", "classifier")
    # The Model and endpoint config add "-<10 hex>" to the endpoint's name; 63 at most.
    assert len(endpoint_name("w" * 40, "x" * 11)) == 52
    with pytest.raises(ValueError, match="longer than 52"):
        endpoint_name("w" * 40, "x" * 12)


# --- apply ---------------------------------------------------------------------------------


def test_apply_copies_verified_archives_and_creates_the_endpoint_once_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, second = models
    s3 = client("s3", aws)
    sagemaker = client("sagemaker", aws)
    # One artifact from the workbench's S3 artifact store, one from local disk.
    s3.upload_file(str(second.tar), SOURCE_BUCKET, "models/acme/mv_second.tar")
    specs = [first.spec(), second.spec(f"s3://{SOURCE_BUCKET}/models/acme/mv_second.tar")]
    pool = PoolSpec(kind="classifier", min_replicas=1)
    fleet = make_fleet(aws, artifact_endpoint_url=aws.url)

    placement = fleet.apply(pool, specs, previous={"mv_first": 2})

    assert placement.assignment == {"mv_first": 0, "mv_second": 0}
    assert placement.moved == ["mv_first"]  # it was in set 2 of the previous placement
    assert placement.used_bytes == [first.size + second.size]

    assert object_keys(s3) == [MANIFEST, archive_key(first), archive_key(second)]
    for model in models:
        stored = s3.get_object(Bucket=BUCKET, Key=archive_key(model))
        archive = stored["Body"].read()
        assert archive[:2] == b"\x1f\x8b"  # gzip, as multi-model endpoints want
        assert gzip.decompress(archive) == model.tar.read_bytes()  # the verified tar, intact
        assert stored["Metadata"]["sha256"] == model.sha256

    (model,) = sagemaker.list_models()["Models"]
    described = sagemaker.describe_model(ModelName=model["ModelName"])
    assert described["ModelName"].startswith(f"{ENDPOINT}-")
    assert described["ExecutionRoleArn"] == ROLE
    assert described["PrimaryContainer"] == {
        "Image": IMAGE,
        "Mode": "MultiModel",
        "ModelDataUrl": f"s3://{BUCKET}/endpoints/classifier/",
    }
    (config,) = sagemaker.list_endpoint_configs()["EndpointConfigs"]
    (variant,) = sagemaker.describe_endpoint_config(
        EndpointConfigName=config["EndpointConfigName"]
    )["ProductionVariants"]
    assert variant["ModelName"] == described["ModelName"]
    assert variant["InstanceType"] == "ml.m5.large"
    assert variant["InitialInstanceCount"] == 1
    (endpoint,) = sagemaker.list_endpoints()["Endpoints"]
    assert endpoint["EndpointName"] == ENDPOINT
    assert endpoint["EndpointStatus"] == "InService"
    created = {
        "model": described["CreationTime"],
        "config": config["CreationTime"],
        "endpoint": endpoint["CreationTime"],
    }

    # The same spec again, even from a fresh process: it only looks, it changes nothing.
    aws.forget_requests()
    again = make_fleet(aws).apply(pool, specs, previous=placement.assignment)
    assert again.assignment == placement.assignment
    assert again.moved == []
    actions = aws.sagemaker_actions()
    assert "DescribeEndpoint" in actions
    assert [a for a in actions if a.startswith(("Create", "Update", "Delete"))] == []
    s3_writes = [
        r
        for r in aws.requests()
        if r["method"] in {"PUT", "POST", "DELETE"} and "x-amz-target" not in r["headers"]
    ]
    assert s3_writes == []
    assert object_keys(s3) == [MANIFEST, archive_key(first), archive_key(second)]
    assert [m["CreationTime"] for m in sagemaker.list_models()["Models"]] == [created["model"]]
    configs = sagemaker.list_endpoint_configs()["EndpointConfigs"]
    assert [c["CreationTime"] for c in configs] == [created["config"]]
    endpoints = sagemaker.list_endpoints()["Endpoints"]
    assert [e["CreationTime"] for e in endpoints] == [created["endpoint"]]


def test_removed_model_archive_is_deleted_and_no_longer_served_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, second = models
    s3 = client("s3", aws)
    pool = PoolSpec(kind="classifier")
    fleet = make_fleet(aws)
    fleet.apply(pool, [first.spec(), second.spec()])
    assert object_keys(s3) == [MANIFEST, archive_key(first), archive_key(second)]

    placement = fleet.apply(pool, [first.spec()])

    assert placement.assignment == {"mv_first": 0}
    assert object_keys(s3) == [MANIFEST, archive_key(first)]
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=MANIFEST)["Body"].read())
    assert [m["model_id"] for m in manifest["models"]] == ["mv_first"]
    with pytest.raises(KeyError):
        fleet.predict("classifier", "mv_second", TEXTS)
    # Another process reads the same from S3.
    with pytest.raises(KeyError):
        make_fleet(aws).predict("classifier", "mv_second", TEXTS)
    (pool_status,) = make_fleet(aws).status()["pools"]
    assert [m["model_id"] for m in pool_status["models"]] == ["mv_first"]
    assert aws.invocations() == []  # the removed model was refused before any call


def test_sha256_mismatch_and_unreadable_artifacts_copy_nothing_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained], tmp_path: Path
) -> None:
    first, second = models
    pool = PoolSpec(kind="classifier")
    fleet = make_fleet(aws)
    # The second model's spec names the first one's sha256: its bytes are refused, and the
    # good first model is not copied either.
    with pytest.raises(ModelLoadError, match=f"not {first.sha256}"):
        fleet.apply(pool, [first.spec(), second.spec(sha256=first.sha256)])
    assert_nothing_created(aws)

    missing = (tmp_path / "gone.tar").as_uri()
    with pytest.raises(ModelLoadError, match="cannot read"):
        fleet.apply(pool, [first.spec(), second.spec(missing)])
    with pytest.raises(ModelLoadError, match="cannot read"):
        fleet.apply(pool, [second.spec(f"s3://{SOURCE_BUCKET}/models/none.tar")])
    with pytest.raises(ModelLoadError, match="unsupported artifact uri"):
        fleet.apply(pool, [second.spec("https://example.com/model.tar")])
    with pytest.raises(ValueError, match="invalid model id"):
        fleet.apply(pool, [second.spec(model_id="../escape")])
    assert_nothing_created(aws)

    # Other bytes under a model id already copied are refused, never overwritten.
    fleet.apply(pool, [first.spec()])
    before = client("s3", aws).get_object(Bucket=BUCKET, Key=archive_key(first))["Body"].read()
    with pytest.raises(ModelLoadError, match="never overwritten"):
        fleet.apply(pool, [first.spec(second.tar.as_uri(), sha256=second.sha256)])
    after = client("s3", aws).get_object(Bucket=BUCKET, Key=archive_key(first))["Body"].read()
    assert after == before


def test_insufficient_capacity_copies_nothing_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, second = models
    fleet = make_fleet(aws)
    # Room for the first model on each of two sets, but not for both models.
    half = (first.size + second.size - 1) // 2
    assert half >= first.size
    small = PoolSpec(kind="classifier", replica_memory_bytes=half, max_sets=2)

    with pytest.raises(InsufficientCapacity) as refused:
        fleet.apply(small, [first.spec(), second.spec()])
    assert refused.value.need_bytes == first.size + second.size
    assert refused.value.have_bytes == 2 * half
    # Adapters on one shared base: the base is counted once.
    base = {"base_sha256": "b" * 64, "base_memory_bytes": 7}
    with pytest.raises(InsufficientCapacity) as refused:
        fleet.apply(small, [first.spec(**base), second.spec(**base)])
    assert refused.value.need_bytes == first.size + second.size + 7
    assert_nothing_created(aws)

    # Unpinned models live in the endpoint's own LRU cache and take no pinned budget.
    placement = fleet.apply(small, [first.spec(), second.spec(pinned=False)])
    assert placement.assignment == {"mv_first": 0}
    assert placement.used_bytes == [first.size]
    assert object_keys(client("s3", aws)) == [MANIFEST, archive_key(first), archive_key(second)]


# --- warm-up and predictions ---------------------------------------------------------------


def test_warm_up_and_predict_send_target_model_and_return_its_answers_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, second = models
    fleet = make_fleet(aws)
    fleet.apply(PoolSpec(kind="classifier"), [first.spec(), second.spec()])
    expected_first = first.classifier.predict(TEXTS)
    expected_second = second.classifier.predict(TEXTS)
    # Disjoint labels: the two models cannot give the same answer.
    assert {p["label"] for p in expected_first}.isdisjoint(p["label"] for p in expected_second)
    aws.queue_invocation_results(
        first.classifier.predict(WARMUP),
        second.classifier.predict(WARMUP),
        expected_first,
        expected_second,
    )
    aws.forget_requests()

    ready = fleet.wait_ready("classifier", ["mv_first", "mv_second", "mv_ghost"], timeout_s=30)

    assert ready == {"mv_first": None, "mv_second": None, "mv_ghost": "not in pool"}
    answer = fleet.predict("classifier", "mv_first", TEXTS)
    assert answer.outputs == expected_first
    assert answer.replica_id == f"{ENDPOINT}/AllTraffic"
    assert answer.latency_ms > 0
    assert fleet.predict("classifier", "mv_second", TEXTS).outputs == expected_second
    # The same model and texts again: moto repeats its answer for the same TargetModel.
    assert fleet.predict("classifier", "mv_first", TEXTS).outputs == expected_first
    with pytest.raises(KeyError):
        fleet.predict("classifier", "mv_ghost", TEXTS)

    path = f"/endpoints/{ENDPOINT}/invocations"
    assert aws.invocations() == [
        (path, "mv_first.tar.gz", {"inputs": WARMUP}),
        (path, "mv_second.tar.gz", {"inputs": WARMUP}),
        (path, "mv_first.tar.gz", {"inputs": TEXTS}),
        (path, "mv_second.tar.gz", {"inputs": TEXTS}),
        (path, "mv_first.tar.gz", {"inputs": TEXTS}),
    ]
    invoke = next(r for r in aws.requests() if r["path"] == path)
    assert invoke["headers"]["content-type"] == "application/json"

    (pool,) = fleet.status()["pools"]
    by_id = {m["model_id"]: m for m in pool["models"]}
    assert by_id["mv_first"]["requests"] == 2
    assert by_id["mv_second"]["requests"] == 1
    assert by_id["mv_first"]["errors"] == 0
    latency = by_id["mv_first"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    single = by_id["mv_second"]["latency_ms"]
    assert 0 < single["p50"] == single["p95"] == single["p99"]
    for model_id in ("mv_first", "mv_second"):
        warmup = by_id[model_id]["last_warmup"]
        assert warmup["error"] is None
        assert warmup["ms"] > 0


def test_warm_up_reports_a_container_answering_nonsense_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, _ = models
    fleet = make_fleet(aws)
    fleet.apply(PoolSpec(kind="classifier"), [first.spec()])
    # Nothing queued: moto answers its static "body", which is no outputs response.
    ready = fleet.wait_ready("classifier", ["mv_first"], timeout_s=30)
    assert ready["mv_first"] is not None
    assert "not an outputs response" in ready["mv_first"]
    with pytest.raises(InvalidResponse):
        fleet.predict("classifier", "mv_first", TEXTS)
    (pool,) = fleet.status()["pools"]
    (model,) = pool["models"]
    assert model["requests"] == 1
    assert model["errors"] == 1
    assert model["latency_ms"] is None
    assert "not an outputs response" in model["last_warmup"]["error"]


def test_wait_ready_without_an_endpoint_names_the_missing_endpoint_against_moto_aws_stand_in(
    aws: MotoServer,
) -> None:
    ready = make_fleet(aws).wait_ready("classifier", ["mv_first"], timeout_s=2)
    assert ready["mv_first"] is not None
    assert ENDPOINT in ready["mv_first"]
    assert aws.invocations() == []


# --- capacity changes and status -----------------------------------------------------------


def test_instance_count_follows_min_replicas_without_a_new_config_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, _ = models
    fleet = make_fleet(aws)
    sagemaker = client("sagemaker", aws)
    fleet.apply(PoolSpec(kind="classifier", min_replicas=1), [first.spec()])
    fleet.apply(PoolSpec(kind="classifier", min_replicas=2), [first.spec()])

    (variant,) = sagemaker.describe_endpoint(EndpointName=ENDPOINT)["ProductionVariants"]
    assert variant["CurrentInstanceCount"] == 2
    assert len(sagemaker.list_endpoint_configs()["EndpointConfigs"]) == 1
    (pool,) = fleet.status()["pools"]
    (replica_set,) = pool["sets"]
    assert [r["replica_id"] for r in replica_set["replicas"]] == [
        f"{ENDPOINT}/AllTraffic/0",
        f"{ENDPOINT}/AllTraffic/1",
    ]


def test_models_and_configs_of_older_settings_are_deleted_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, _ = models
    sagemaker = client("sagemaker", aws)
    # What an apply with an older image left behind, and another kind's resources whose
    # names contain this endpoint's name.
    for name in (f"{ENDPOINT}-0123456789", f"{ENDPOINT}-xl-0123456789"):
        sagemaker.create_model(
            ModelName=name,
            ExecutionRoleArn=ROLE,
            PrimaryContainer={"Image": "old", "Mode": "MultiModel", "ModelDataUrl": "s3://x/"},
        )
        sagemaker.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": "AllTraffic",
                    "ModelName": name,
                    "InstanceType": "ml.m5.large",
                    "InitialInstanceCount": 1,
                }
            ],
        )

    make_fleet(aws).apply(PoolSpec(kind="classifier"), [first.spec()])

    assert len(sagemaker.list_endpoints()["Endpoints"]) == 1
    current = sagemaker.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    assert current not in {f"{ENDPOINT}-0123456789", f"{ENDPOINT}-xl-0123456789"}
    models_left = sorted(m["ModelName"] for m in sagemaker.list_models()["Models"])
    configs = sagemaker.list_endpoint_configs()["EndpointConfigs"]
    assert models_left == sorted([current, f"{ENDPOINT}-xl-0123456789"])
    assert sorted(c["EndpointConfigName"] for c in configs) == models_left


def test_status_reads_the_fleet_back_from_aws_in_a_fresh_process_against_moto_aws_stand_in(
    aws: MotoServer, models: tuple[Trained, Trained]
) -> None:
    first, second = models
    pool_spec = PoolSpec(kind="classifier", replica_memory_bytes=10**9, max_sets=2)
    make_fleet(aws).apply(pool_spec, [first.spec(), second.spec(pinned=False)])

    status = make_fleet(aws).status()

    assert status["backend"] == "sagemaker"
    assert (status["region"], status["bucket"], status["prefix"]) == (
        REGION,
        BUCKET,
        "endpoints",
    )
    (pool,) = status["pools"]
    assert pool["kind"] == "classifier"
    assert pool["endpoint"] == ENDPOINT
    assert pool["endpoint_status"] == "InService"
    assert pool["endpoint_config"].startswith(f"{ENDPOINT}-")
    assert pool["instance_type"] == "ml.m5.large"
    assert pool["model_data_url"] == f"s3://{BUCKET}/endpoints/classifier/"
    assert pool["spec"]["replica_memory_bytes"] == 10**9
    (replica_set,) = pool["sets"]
    assert replica_set["index"] == 0
    assert replica_set["pinned_bytes"] == first.size
    assert replica_set["capacity_bytes"] == 2 * 10**9
    (replica,) = replica_set["replicas"]
    assert replica == {
        "replica_id": f"{ENDPOINT}/AllTraffic/0",
        "state": "InService",
        "models": ["mv_first", "mv_second"],
    }
    assert pool["models"] == [
        {
            "model_id": model.model_id,
            "set": 0 if pinned else None,
            "pinned": pinned,
            "memory_bytes": model.size,
            "sha256": model.sha256,
            "artifact": f"s3://{BUCKET}/{archive_key(model)}",
            "target_model": f"{model.model_id}.tar.gz",
            "present": True,
            "requests": 0,
            "errors": 0,
            "latency_ms": None,
            "last_warmup": None,
        }
        for model, pinned in ((first, True), (second, False))
    ]
    json.dumps(status)  # JSON-able as it is
