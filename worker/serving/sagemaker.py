"""The SageMaker backend: one multi-model endpoint (MME) per model kind, driven with boto3.

How SageMaker multi-model endpoints work, and so what this backend does:

- An MME is an ordinary endpoint whose SageMaker *Model* has ``Mode="MultiModel"`` and a
  ``ModelDataUrl`` that is an S3 *prefix*. Every ``.tar.gz`` under that prefix is a model the
  endpoint can serve; an invocation names one with ``TargetModel`` (its key relative to the
  prefix), and the instance that gets it downloads and loads it on first use, then keeps it
  until memory pressure evicts it (LRU). Adding a model is copying its archive under the
  prefix; removing one is deleting the archive. Neither touches the endpoint.
- So :meth:`SageMakerFleet.apply` copies each model version's artifact to
  ``s3://<bucket>/<prefix>/<kind>/<model_id>.tar.gz``, creates the SageMaker Model, endpoint
  config and endpoint of the kind if they are missing, and deletes the archives of models
  that left the spec. Re-applying the same spec makes no request that changes anything.
- Archives: the workbench's artifact is an uncompressed, deterministic tar (verified here
  against its ``sha256`` before anything is copied; other bytes are refused with
  :class:`ModelLoadError`). MME wants ``.tar.gz``, so the tar is gzipped on the way, with a
  zero mtime and no file name in the gzip header so the same tar always gives the same
  archive. The tar inside is byte-for-byte the one that was verified.
- AWS says never to overwrite an archive in place (an instance may keep serving the old
  bytes it has cached), so a model id is copied once; finding other bytes at its key is
  refused rather than overwritten. A model version's bytes never change in the workbench.
- Warm-up (:meth:`SageMakerFleet.wait_ready`): wait for the endpoint to be ``InService``
  (a boto3 waiter), then invoke each model once with ``TargetModel``: that first call is
  what makes an instance download and load it. ``ModelNotReadyException`` (still loading)
  is retried until the deadline.
- Placement: an MME has no explicit placement (SageMaker routes each model to instances
  itself), so every pinned model is "in set 0". The capacity check still holds: the pinned
  total (each adapters' shared base counted once) must fit ``replica_memory_bytes *
  max_sets`` or :class:`InsufficientCapacity` is raised before anything is copied.
- Instance count is ``pool.min_replicas``; a change of it alone is applied with
  ``UpdateEndpointWeightsAndCapacities`` (no new config). A change of image, role or
  instance type makes a new Model and endpoint config (their names carry a hash of those
  settings) and moves the endpoint to them with ``UpdateEndpoint``; the old ones are deleted
  by a later apply once the endpoint serves from the new config.

The request and response bodies the inference image must speak: request
``{"inputs": [text, ...]}`` (``application/json``), response
``{"outputs": [{"label": str, "score": float}, ...]}``, one output per input.

What this object remembers in memory is only what it measured itself: per-model request
counts, errors and latencies (client-side, around the whole round trip) and the last
warm-up. What should be live is read back from S3: each kind's manifest
(``<prefix>/<kind>.manifest.json``, written by :meth:`apply`) and the archives under
``<prefix>/<kind>/``, so a fresh object in another process sees the same fleet.

:meth:`SageMakerFleet.status` returns::

    {"backend": "sagemaker", "region": str, "bucket": str, "prefix": str,
     "pools": [{
        "kind": str, "endpoint": str, "endpoint_status": str ("Missing" if none),
        "endpoint_config": str | None, "instance_type": str | None,
        "model_data_url": "s3://bucket/prefix/kind/", "spec": {PoolSpec fields} | None,
        "sets": [{"index": 0, "pinned_bytes": int, "capacity_bytes": int,
                  "replicas": [{"replica_id": "<endpoint>/<variant>/<n>", "state": str,
                                "models": [model_id, ...]}]}],
        "models": [{"model_id": str, "set": 0 | None (unpinned), "pinned": bool,
                    "memory_bytes": int | None, "sha256": str | None,
                    "artifact": "s3://...tar.gz", "target_model": "<model_id>.tar.gz",
                    "present": bool, "requests": int, "errors": int,
                    "latency_ms": {"p50", "p95", "p99"} | None,
                    "last_warmup": {"at": iso8601, "ms": float, "error": str | None} | None}]
     }]}

A replica's ``models`` are the archives under the prefix: any instance may load any of them
and SageMaker does not say which one holds what.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import re
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, WaiterError

from worker.serving.placement import spec_bases
from worker.serving.specs import (
    InsufficientCapacity,
    ModelLoadError,
    ModelSpec,
    Output,
    Placement,
    PoolSpec,
    PredictResult,
)

VARIANT = "AllTraffic"
ARCHIVE_SUFFIX = ".tar.gz"
CHUNK = 1024 * 1024
# SageMaker resource names: 1-63 characters, letters, digits and inner hyphens.
_SAGEMAKER_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
_NAME_MAX = 63
_HASH_CHARS = 10  # "<endpoint>-<hash>" for the Model and config: 11 characters more
_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Model ids become S3 key segments and TargetModel values.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
# Latency samples kept per model for the percentiles: recent traffic, bounded memory.
_SAMPLES = 2048
# A predict's membership check re-reads the manifest on a miss at most this often.
_INDEX_REFRESH_S = 5.0


class InvalidResponse(RuntimeError):
    """The endpoint answered, but not with one ``{"label", "score"}`` per input."""


def endpoint_name(endpoint_prefix: str, kind: str) -> str:
    """The endpoint serving ``kind``: ``<endpoint_prefix>-<kind>`` (``_`` becomes ``-``).

    Deterministic, so every process drives the same endpoint; a name SageMaker would refuse
    (or one too long to carry the 11-character hash suffix of its Model and config) raises
    ``ValueError`` here rather than half-way through an apply.
    """
    if not _KIND.match(kind):
        raise ValueError(f"invalid pool kind {kind!r}: use letters, digits, '-' and '_'")
    name = f"{endpoint_prefix}-{kind.replace('_', '-')}"
    if not _SAGEMAKER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid SageMaker endpoint name")
    if len(name) > _NAME_MAX - 1 - _HASH_CHARS:
        raise ValueError(
            f"endpoint name {name!r} is longer than {_NAME_MAX - 1 - _HASH_CHARS} characters"
        )
    return name


@dataclass
class _ModelMetrics:
    """What this object measured of one model: its requests and its last warm-up."""

    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    last_warmup: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        latency: dict[str, float] | None = None
        if len(self.latencies_ms) == 1:
            (only,) = self.latencies_ms  # quantiles() wants two points at least
            latency = {"p50": only, "p95": only, "p99": only}
        elif self.latencies_ms:
            # "inclusive" is linear interpolation between order statistics (numpy's default).
            cuts = statistics.quantiles(self.latencies_ms, n=100, method="inclusive")
            latency = {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": latency,
            "last_warmup": self.last_warmup,
        }


@dataclass
class _Index:
    """The model ids live in one pool, as last read from (or written to) its manifest."""

    model_ids: frozenset[str]
    read_at: float


@dataclass(frozen=True)
class _Staged:
    spec: ModelSpec
    archive: Path


class SageMakerFleet:
    """A :class:`worker.serving.specs.ServingBackend` on SageMaker multi-model endpoints.

    ``bucket``/``prefix``: where the endpoints' archives live (``<prefix>/<kind>/``);
    ``role_arn``: the execution role SageMaker assumes to read them and pull the image;
    ``image_uri``: the multi-model inference image; ``instance_type``: of every endpoint;
    ``endpoint_prefix``: endpoints are ``<endpoint_prefix>-<kind>``. ``session`` and
    ``endpoint_url`` let a caller choose credentials or point every client (S3, SageMaker,
    SageMaker Runtime) at another server. ``warmup_texts`` are what a warm-up invocation
    sends. ``artifact_endpoint_url`` is the S3 server that ``s3://`` source artifacts are
    read from when it is not the endpoints' (the workbench's artifact store on MinIO).
    """

    def __init__(
        self,
        *,
        region: str,
        bucket: str,
        prefix: str,
        role_arn: str,
        image_uri: str,
        instance_type: str = "ml.m5.large",
        endpoint_prefix: str = "workbench",
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        warmup_texts: Sequence[str] = ("hello",),
        predict_timeout_s: float = 120.0,
        artifact_endpoint_url: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("a bucket is required")
        if not warmup_texts:
            raise ValueError("warm-up needs at least one text")
        endpoint_name(endpoint_prefix, "x")  # refuse a bad prefix now, not on first apply
        self.region = region
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.role_arn = role_arn
        self.image_uri = image_uri
        self.instance_type = instance_type
        self.endpoint_prefix = endpoint_prefix
        self.warmup_texts = list(warmup_texts)
        self.predict_timeout_s = predict_timeout_s
        session = session or boto3.Session(region_name=region)
        # Control-plane calls are quick; botocore's 60 s connect timeout (retried) would
        # hang an apply for minutes on a host that never answers.
        control = Config(
            connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 3}
        )
        # An MME's first invocation of a model can take up to 60 s while it loads; AWS
        # advises a socket timeout above that. ModelNotReadyException is retried below,
        # not by botocore, so the deadline stays ours.
        runtime = Config(
            connect_timeout=5, read_timeout=70, retries={"mode": "standard", "max_attempts": 2}
        )
        self._s3: Any = session.client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=control
        )
        self._sagemaker: Any = session.client(
            "sagemaker", region_name=region, endpoint_url=endpoint_url, config=control
        )
        self._runtime: Any = session.client(
            "sagemaker-runtime", region_name=region, endpoint_url=endpoint_url, config=runtime
        )
        self._artifact_s3: Any = (
            session.client(
                "s3", region_name=region, endpoint_url=artifact_endpoint_url, config=control
            )
            if artifact_endpoint_url
            else self._s3
        )
        self._lock = threading.Lock()
        self._metrics: dict[tuple[str, str], _ModelMetrics] = {}
        self._indexes: dict[str, _Index] = {}

    # --- names and keys -----------------------------------------------------------------

    def endpoint_name(self, kind: str) -> str:
        return endpoint_name(self.endpoint_prefix, kind)

    def _kind_prefix(self, kind: str) -> str:
        """The S3 key prefix of a kind's archives, with its trailing slash."""
        return f"{self.prefix}/{kind}/" if self.prefix else f"{kind}/"

    def model_data_url(self, kind: str) -> str:
        return f"s3://{self.bucket}/{self._kind_prefix(kind)}"

    def _manifest_key(self, kind: str) -> str:
        # Beside the kind's folder, not in it: only model archives live under an MME prefix.
        return f"{self.prefix}/{kind}.manifest.json" if self.prefix else f"{kind}.manifest.json"

    @staticmethod
    def target_model(model_id: str) -> str:
        """The ``TargetModel`` of a model: its archive's key relative to the MME prefix."""
        return f"{model_id}{ARCHIVE_SUFFIX}"

    def _archive_key(self, kind: str, model_id: str) -> str:
        return self._kind_prefix(kind) + self.target_model(model_id)

    def _resource_name(self, kind: str) -> str:
        """Name of the kind's SageMaker Model and endpoint config for the current settings.

        The settings a Model or config cannot change in place (image, role, archive prefix,
        instance type) are hashed into the name, so new settings make new resources and the
        endpoint is moved to them; the same settings find the existing ones.
        """
        settings = json.dumps(
            [self.image_uri, self.role_arn, self.model_data_url(kind), self.instance_type]
        )
        digest = hashlib.sha256(settings.encode()).hexdigest()[:_HASH_CHARS]
        return f"{self.endpoint_name(kind)}-{digest}"

    # --- apply --------------------------------------------------------------------------

    def apply(
        self,
        pool: PoolSpec,
        models: Sequence[ModelSpec],
        *,
        previous: Mapping[str, int] | None = None,
    ) -> Placement:
        """Make the kind's endpoint serve exactly ``models``.

        In order: check names and capacity; read and verify every new artifact into a local
        staging directory (nothing is copied unless all of them verify); copy the new
        archives; create the SageMaker Model, endpoint config and endpoint if missing (or
        move the endpoint to new settings); write the manifest; delete the archives of
        models that left the spec; delete Models and configs no longer in use.
        """
        endpoint = self.endpoint_name(pool.kind)
        ids = [model.model_id for model in models]
        for model_id in ids:
            if not _MODEL_ID.match(model_id):
                raise ValueError(f"invalid model id {model_id!r}")
        if len(set(ids)) != len(ids):
            raise ValueError("a model id appears twice in the spec")

        pinned = [model for model in models if model.pinned]
        # Each shared base once: the least an instance that holds its adapters needs.
        need = sum(model.memory_bytes for model in pinned) + sum(spec_bases(pinned)[1].values())
        have = pool.replica_memory_bytes * pool.max_sets
        if need > have:
            raise InsufficientCapacity(
                need_bytes=need,
                have_bytes=have,
                detail=f"endpoint {endpoint}: pinned models exceed the instance memory budget",
            )

        existing = self._list_archives(pool.kind)
        for model in models:
            if model.model_id in existing:
                self._check_copied(pool.kind, model)
        with tempfile.TemporaryDirectory(prefix="sagemaker-apply-") as tmp:
            staged = [
                self._stage(model, Path(tmp)) for model in models if model.model_id not in existing
            ]
            for item in staged:
                self._s3.upload_file(
                    str(item.archive),
                    self.bucket,
                    self._archive_key(pool.kind, item.spec.model_id),
                    ExtraArgs={
                        "ContentType": "application/gzip",
                        "Metadata": {"sha256": item.spec.sha256},
                    },
                )

        self._ensure_endpoint(pool, endpoint)

        # The manifest goes first: readers stop routing to a removed model before its
        # archive disappears, and see a new one only once its archive is there.
        self._write_manifest(pool, models)
        keep = set(ids)
        for model_id, key in existing.items():
            if model_id not in keep:
                # AWS: stop invoking it and delete it from S3. An instance may still hold it
                # in memory until evicted; predict() already refuses it (KeyError).
                self._s3.delete_object(Bucket=self.bucket, Key=key)
        with self._lock:
            for gone in [k for k in self._metrics if k[0] == pool.kind and k[1] not in keep]:
                del self._metrics[gone]
            self._indexes[pool.kind] = _Index(frozenset(ids), time.monotonic())
        self._collect_garbage(pool.kind, endpoint)

        before = previous or {}
        return Placement(
            assignment={model.model_id: 0 for model in pinned},
            moved=[m.model_id for m in pinned if before.get(m.model_id, 0) != 0],
            used_bytes=[need],
        )

    def _list_archives(self, kind: str) -> dict[str, str]:
        """model id -> key of every archive under the kind's prefix."""
        found: dict[str, str] = {}
        prefix = self._kind_prefix(kind)
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if "/" not in name and name.endswith(ARCHIVE_SUFFIX):
                    found[name[: -len(ARCHIVE_SUFFIX)]] = item["Key"]
        return found

    def _check_copied(self, kind: str, model: ModelSpec) -> None:
        """Refuse an archive already copied for ``model`` that holds other bytes.

        Refused, not overwritten: AWS warns an instance may keep serving the old archive it
        cached. The sha256 of the verified tar travels as the archive's S3 metadata.
        """
        key = self._archive_key(kind, model.model_id)
        head = self._s3.head_object(Bucket=self.bucket, Key=key)
        if head.get("Metadata", {}).get("sha256") == model.sha256:
            return
        raise ModelLoadError(
            f"s3://{self.bucket}/{key} already holds other bytes than sha256 {model.sha256}; "
            "a model version's archive is never overwritten"
        )

    def _stage(self, model: ModelSpec, tmp: Path) -> _Staged:
        """Read the artifact, check its sha256 and gzip it into ``tmp``."""
        archive = tmp / self.target_model(model.model_id)
        digest = hashlib.sha256()
        try:
            with (
                self._open_artifact(model.artifact_uri) as source,
                archive.open("wb") as raw,
                # Level 1: safetensors weights barely compress; this is for the format.
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz,
            ):
                for chunk in source:
                    digest.update(chunk)
                    gz.write(chunk)
        except (OSError, ClientError) as exc:
            raise ModelLoadError(f"cannot read {model.artifact_uri}: {exc}") from exc
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"{model.artifact_uri} has sha256 {digest.hexdigest()}, not {model.sha256}; "
                f"model {model.model_id} refused"
            )
        return _Staged(model, archive)

    def _open_artifact(self, uri: str) -> _Chunks:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return _Chunks(Path(parsed.netloc + parsed.path).open("rb"))
        if parsed.scheme == "s3" and parsed.netloc:
            body = self._artifact_s3.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
            return _Chunks(body["Body"])
        raise ModelLoadError(f"unsupported artifact uri {uri!r}: use file:// or s3://")

    def _ensure_endpoint(self, pool: PoolSpec, endpoint: str) -> None:
        """Create what is missing; move an existing endpoint to new settings or count."""
        name = self._resource_name(pool.kind)
        tags = [{"Key": "workbench-pool", "Value": pool.kind}]
        if self._describe("describe_model", ModelName=name) is None:
            self._sagemaker.create_model(
                ModelName=name,
                ExecutionRoleArn=self.role_arn,
                PrimaryContainer={
                    "Image": self.image_uri,
                    "Mode": "MultiModel",
                    "ModelDataUrl": self.model_data_url(pool.kind),
                },
                Tags=tags,
            )
        if self._describe("describe_endpoint_config", EndpointConfigName=name) is None:
            self._sagemaker.create_endpoint_config(
                EndpointConfigName=name,
                ProductionVariants=[
                    {
                        "VariantName": VARIANT,
                        "ModelName": name,
                        "InstanceType": self.instance_type,
                        "InitialInstanceCount": pool.min_replicas,
                    }
                ],
                Tags=tags,
            )
        current = self._describe("describe_endpoint", EndpointName=endpoint)
        if current is None:
            self._sagemaker.create_endpoint(
                EndpointName=endpoint, EndpointConfigName=name, Tags=tags
            )
        elif current["EndpointConfigName"] != name:
            self._sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=name)
        elif _desired_instances(current) not in (None, pool.min_replicas):
            self._sagemaker.update_endpoint_weights_and_capacities(
                EndpointName=endpoint,
                DesiredWeightsAndCapacities=[
                    {"VariantName": VARIANT, "DesiredInstanceCount": pool.min_replicas}
                ],
            )

    def _collect_garbage(self, kind: str, endpoint: str) -> None:
        """Delete this kind's Models and configs of older settings once nothing uses them."""
        current = self._describe("describe_endpoint", EndpointName=endpoint)
        name = self._resource_name(kind)
        if current is None or current["EndpointStatus"] != "InService":
            return
        if current["EndpointConfigName"] != name:
            return  # still moving to the new config
        ours = re.compile(rf"^{re.escape(endpoint)}-[0-9a-f]{{{_HASH_CHARS}}}$")
        for page in self._sagemaker.get_paginator("list_endpoint_configs").paginate(
            NameContains=endpoint
        ):
            for config in page["EndpointConfigs"]:
                old = config["EndpointConfigName"]
                if ours.match(old) and old != name:
                    self._sagemaker.delete_endpoint_config(EndpointConfigName=old)
        for page in self._sagemaker.get_paginator("list_models").paginate(NameContains=endpoint):
            for model in page["Models"]:
                old = model["ModelName"]
                if ours.match(old) and old != name:
                    self._sagemaker.delete_model(ModelName=old)

    def _describe(self, operation: str, **kwargs: str) -> dict[str, Any] | None:
        """A describe_* answer, or None when the resource does not exist."""
        try:
            result: dict[str, Any] = getattr(self._sagemaker, operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "ValidationException" and "Could not find" in str(
                error.get("Message", "")
            ):
                return None
            raise
        return result

    def _write_manifest(self, pool: PoolSpec, models: Sequence[ModelSpec]) -> None:
        """Record the applied spec beside the archives; unchanged, it is not rewritten."""
        manifest = {
            "kind": pool.kind,
            "endpoint": self.endpoint_name(pool.kind),
            "pool": dataclasses.asdict(pool),
            "models": [dataclasses.asdict(model) for model in models],
        }
        if self._read_manifest(pool.kind) == manifest:
            return
        self._s3.put_object(
            Bucket=self.bucket,
            Key=self._manifest_key(pool.kind),
            Body=json.dumps(manifest, sort_keys=True).encode(),
            ContentType="application/json",
        )

    def _read_manifest(self, kind: str) -> dict[str, Any] | None:
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=self._manifest_key(kind))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        with body:
            manifest: dict[str, Any] = json.loads(body.read())
        return manifest

    # --- warm-up and predictions ----------------------------------------------------------

    def wait_ready(
        self, kind: str, model_ids: Sequence[str], *, timeout_s: float
    ) -> dict[str, str | None]:
        """Wait for the endpoint to be InService, then invoke each model once.

        Returns model id -> None once a warm-up invocation came back with one output per
        warm-up text, else why not: the endpoint's failure, "timeout", "not in pool", the
        container's error. Models are warmed one after another, so a timeout leaves the
        later ones "timeout".
        """
        deadline = time.monotonic() + timeout_s
        endpoint = self.endpoint_name(kind)
        waited = self._wait_in_service(endpoint, timeout_s)
        if waited is not None:
            return dict.fromkeys(model_ids, waited)
        live = self._live_models(kind, refresh=True)
        results: dict[str, str | None] = {}
        for model_id in model_ids:
            if model_id not in live:
                results[model_id] = "not in pool"
                continue
            started = time.perf_counter()
            error: str | None = None
            try:
                self._invoke(endpoint, model_id, self.warmup_texts, deadline)
            except TimeoutError:
                error = "timeout"
            except (ModelLoadError, InvalidResponse, ClientError) as exc:
                error = str(exc)
            results[model_id] = error
            warmup = {
                "at": dt.datetime.now(dt.UTC).isoformat(),
                "ms": (time.perf_counter() - started) * 1000,
                "error": error,
            }
            with self._lock:
                self._metrics.setdefault((kind, model_id), _ModelMetrics()).last_warmup = warmup
        return results

    def _wait_in_service(self, endpoint: str, timeout_s: float) -> str | None:
        """None once InService; else the failure reason or "timeout"."""
        delay = min(30.0, max(1.0, timeout_s / 20))
        attempts = max(1, int(timeout_s // delay))
        try:
            self._sagemaker.get_waiter("endpoint_in_service").wait(
                EndpointName=endpoint,
                WaiterConfig={"Delay": int(delay), "MaxAttempts": attempts},
            )
        except WaiterError as exc:
            last = exc.last_response or {}
            if last.get("EndpointStatus") == "Failed":
                return f"endpoint {endpoint} failed: {last.get('FailureReason', 'no reason')}"
            if "Error" in last:
                return f"endpoint {endpoint}: {last['Error'].get('Message', last['Error'])}"
            return "timeout"
        return None

    def predict(self, kind: str, model_id: str, texts: list[str]) -> PredictResult:
        """Invoke the kind's endpoint with ``TargetModel``; KeyError if not in the pool."""
        if model_id not in self._live_models(kind):
            raise KeyError(model_id)
        endpoint = self.endpoint_name(kind)
        started = time.perf_counter()
        try:
            outputs, variant = self._invoke(
                endpoint, model_id, texts, time.monotonic() + self.predict_timeout_s
            )
        except TimeoutError as exc:
            self._record(kind, model_id, None)
            raise ModelLoadError(
                f"model {model_id} still loading after {self.predict_timeout_s:.0f} s"
            ) from exc
        except Exception:
            self._record(kind, model_id, None)
            raise
        latency_ms = (time.perf_counter() - started) * 1000
        self._record(kind, model_id, latency_ms)
        return PredictResult(
            outputs=outputs, latency_ms=latency_ms, replica_id=f"{endpoint}/{variant}"
        )

    def _invoke(
        self, endpoint: str, model_id: str, texts: list[str], deadline: float
    ) -> tuple[list[Output], str]:
        """One invocation, retried while SageMaker says the model is still loading."""
        backoff = 0.5
        while True:
            try:
                response = self._runtime.invoke_endpoint(
                    EndpointName=endpoint,
                    TargetModel=self.target_model(model_id),
                    ContentType="application/json",
                    Accept="application/json",
                    Body=json.dumps({"inputs": texts}),
                )
                break
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = error.get("Code")
                if code == "ModelNotReadyException":
                    if time.monotonic() + backoff > deadline:
                        raise TimeoutError(model_id) from exc
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if code == "ModelError":
                    # The container failed: for an MME this is most often a model that
                    # would not load (bad archive, out of memory).
                    message = exc.response.get("OriginalMessage") or error.get("Message")
                    raise ModelLoadError(f"model {model_id} on {endpoint}: {message}") from exc
                if code == "ValidationError" and "not found" in str(error.get("Message", "")):
                    raise KeyError(model_id) from exc
                raise
        with response["Body"] as body:
            payload = body.read()
        return _parse_outputs(payload, len(texts)), str(
            response.get("InvokedProductionVariant") or VARIANT
        )

    def _record(self, kind: str, model_id: str, latency_ms: float | None) -> None:
        with self._lock:
            metrics = self._metrics.setdefault((kind, model_id), _ModelMetrics())
            metrics.requests += 1
            if latency_ms is None:
                metrics.errors += 1
            else:
                metrics.latencies_ms.append(latency_ms)

    def _live_models(self, kind: str, *, refresh: bool = False) -> frozenset[str]:
        """The model ids the kind's pool serves, from this object's last apply or S3.

        A miss re-reads the manifest (at most every few seconds), so a model applied by
        another process becomes servable here without letting unknown ids hit S3 each time.
        """
        with self._lock:
            index = self._indexes.get(kind)
        stale = index is None or time.monotonic() - index.read_at > _INDEX_REFRESH_S
        if refresh or stale:
            if not _KIND.match(kind):
                return frozenset()
            manifest = self._read_manifest(kind)
            ids = frozenset(m["model_id"] for m in manifest["models"]) if manifest else frozenset()
            index = _Index(ids, time.monotonic())
            with self._lock:
                self._indexes[kind] = index
        assert index is not None
        return index.model_ids

    # --- status -------------------------------------------------------------------------

    def lost(self) -> bool:
        return False  # AWS answers each call or raises; there is no session to lose

    def ensure_connected(self) -> bool:
        return True

    def serving(self, kind: str, model_ids: Sequence[str]) -> dict[str, str | None]:
        """Model id -> None when the endpoint is InService with the model's archive in
        place (an instance loads it on first use), else why not."""
        endpoint = self.endpoint_name(kind)
        described = self._describe("describe_endpoint", EndpointName=endpoint)
        if described is None:
            return dict.fromkeys(model_ids, f"endpoint {endpoint} does not exist")
        state = described.get("EndpointStatus")
        if state not in ("InService", "Updating"):
            return dict.fromkeys(model_ids, f"endpoint {endpoint} is {state}")
        live = self._live_models(kind, refresh=True)
        return {m: None if m in live else "not in pool" for m in model_ids}

    def snapshot(self) -> dict[str, Any]:
        """The status; predicts go through SageMaker's runtime, so no routing table."""
        return {"pools": self.status()["pools"], "routing": {}}

    def status(self) -> dict[str, Any]:
        """The fleet as SageMaker and S3 tell it, with this object's own measurements."""
        return {
            "backend": "sagemaker",
            "region": self.region,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "pools": [self._pool_status(kind) for kind in self._kinds()],
        }

    def _kinds(self) -> list[str]:
        """Kinds with a manifest or archives under the prefix, and any this object applied."""
        root = f"{self.prefix}/" if self.prefix else ""
        kinds: set[str] = set()
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root, Delimiter="/"
        ):
            for common in page.get("CommonPrefixes", []):
                kinds.add(common["Prefix"][len(root) :].rstrip("/"))
            for item in page.get("Contents", []):
                name = item["Key"][len(root) :]
                if name.endswith(".manifest.json"):
                    kinds.add(name[: -len(".manifest.json")])
        return sorted(kind for kind in kinds if _KIND.match(kind))

    def _pool_status(self, kind: str) -> dict[str, Any]:
        endpoint = self.endpoint_name(kind)
        manifest = self._read_manifest(kind) or {}
        specs = {m["model_id"]: m for m in manifest.get("models", [])}
        archives = self._list_archives(kind)
        described = self._describe("describe_endpoint", EndpointName=endpoint)
        state = described["EndpointStatus"] if described else "Missing"
        config_name = described["EndpointConfigName"] if described else None
        instance_type = None
        count = _current_instances(described) if described else 0
        if config_name:
            config = self._describe("describe_endpoint_config", EndpointConfigName=config_name)
            variant = (config or {}).get("ProductionVariants", [{}])[0]
            instance_type = variant.get("InstanceType")
            if count is None:
                count = variant.get("InitialInstanceCount", 0)
        pool = manifest.get("pool")
        on_prefix = sorted(archives)
        pinned_specs = [m for m in specs.values() if m["pinned"]]
        # Each shared base once ("" and 0 for full models; absent from older manifests).
        bases = {m.get("base_sha256", ""): int(m.get("base_memory_bytes", 0)) for m in pinned_specs}
        pinned_bytes = sum(int(m["memory_bytes"]) for m in pinned_specs) + sum(bases.values())
        with self._lock:
            measured = {
                model_id: metrics.snapshot()
                for (k, model_id), metrics in self._metrics.items()
                if k == kind
            }
        empty = _ModelMetrics().snapshot()
        models = []
        for model_id in sorted(set(specs) | set(archives)):
            spec = specs.get(model_id, {})
            pinned = bool(spec.get("pinned", False))
            models.append(
                {
                    "model_id": model_id,
                    "set": 0 if pinned else None,
                    "pinned": pinned,
                    "memory_bytes": spec.get("memory_bytes"),
                    "sha256": spec.get("sha256"),
                    "artifact": f"s3://{self.bucket}/{self._archive_key(kind, model_id)}",
                    "target_model": self.target_model(model_id),
                    "present": model_id in archives,
                    **measured.get(model_id, empty),
                }
            )
        return {
            "kind": kind,
            "endpoint": endpoint,
            "endpoint_status": state,
            "endpoint_config": config_name,
            "instance_type": instance_type,
            "model_data_url": self.model_data_url(kind),
            "spec": pool,
            "sets": [
                {
                    "index": 0,
                    "pinned_bytes": pinned_bytes,
                    "capacity_bytes": pool["replica_memory_bytes"] * pool["max_sets"]
                    if pool
                    else None,
                    "replicas": [
                        {
                            "replica_id": f"{endpoint}/{VARIANT}/{n}",
                            "state": state,
                            "models": on_prefix,
                        }
                        for n in range(count or 0)
                    ],
                }
            ],
            "models": models,
        }


class _Chunks:
    """A readable body as a context manager that iterates fixed-size chunks."""

    def __init__(self, handle: IO[bytes] | Any) -> None:
        self._handle = handle

    def __enter__(self) -> Iterator[bytes]:
        return iter(lambda: self._handle.read(CHUNK), b"")

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def _variant(endpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for variant in endpoint.get("ProductionVariants", []):
        if variant.get("VariantName") == VARIANT:
            return dict(variant)
    return {}


def _desired_instances(endpoint: Mapping[str, Any]) -> int | None:
    count = _variant(endpoint).get("DesiredInstanceCount")
    return int(count) if count is not None else None


def _current_instances(endpoint: Mapping[str, Any]) -> int | None:
    count = _variant(endpoint).get("CurrentInstanceCount")
    return int(count) if count is not None else None


def _parse_outputs(payload: bytes, expected: int) -> list[Output]:
    """``{"outputs": [{"label", "score"}, ...]}`` with one output per input, or raise."""
    try:
        outputs = json.loads(payload)["outputs"]
        parsed = [Output(label=str(o["label"]), score=float(o["score"])) for o in outputs]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidResponse(f"not an outputs response: {payload[:200]!r}") from exc
    if len(parsed) != expected:
        raise InvalidResponse(f"{len(parsed)} outputs for {expected} inputs")
    return parsed
