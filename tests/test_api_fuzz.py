"""schemathesis walks the whole API on a live server (gunicorn on the test database).

Every operation of ``/api/v1/schema/`` is fuzzed in schemathesis's four phases: examples
(the seeded objects' ids as the path parameters' examples, so each operation is called once
with ids that exist), coverage (boundary and invalid values, methods a path does not take),
fuzzing, and stateful sequences that follow the schema's links from the ids one response
answers to the operations that take them. The caller is a staff user, the only admin of the
fuzzed tenant, with the tenant path parameter fixed to it. It must find no server error and
no response the schema does not describe (status code, content type, body, headers), and
every operation must answer something other than 404 at least once. The fleet and
JupyterHub are not running: predicts and notebook servers answer their documented 409/503.

The seed is ``FUZZ_SEED`` when set; under CI (``CI`` set) a fixed one, so that a landing is
judged on the same walk each time; elsewhere a random one, so that developers' runs explore
further. A failure prints it (``--seed``) with schemathesis's report, so it can be run again
the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from django.conf import settings

from apps.datasets import services as datasets
from apps.deployments.models import Deployment
from apps.evaluation.models import Evaluation
from apps.notebooks import grants
from apps.notebooks.models import NotebookServer
from apps.promotions.models import PromotionRequest
from apps.tenants.models import ApiToken, Role, Tenant
from apps.tenants.services import token_create
from apps.training import services as training
from tests.autocomplete_helpers import register_autocomplete, reply_version
from tests.conftest import Actor, free_port, make_actor
from tests.embedding_helpers import knowledge_base
from tests.training_helpers import make_training_version, placeholder_version, wait_for

pytestmark = [pytest.mark.django_db(transaction=True)]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
# Bounds that keep the whole run to a couple of minutes on a 2-core machine.
MAX_EXAMPLES = 4
STATEFUL_SCENARIOS = 40
STATEFUL_STEPS = 10
FUZZ_TIMEOUT_S = 600
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]
ACCESS_LINE = re.compile(r'"([A-Z]+) (/api/v1/[^ ?"]*)\S* HTTP/[0-9.]+" (\d{3}) ')


def seed(tenant: Tenant, fuzzer: Actor, scientist: Actor, reviewer: Actor) -> dict[str, Any]:
    """One of each object the API has ids for, so that lists answer ids to follow; returns
    them by the path parameter that takes them."""
    golden = make_training_version(fuzzer, name="golden-intents", kind="golden")
    model_version = placeholder_version(scientist, tenant, sha256="ab" * 32)
    version = model_version.run.dataset_version
    evaluation = Evaluation.objects.create(
        tenant=tenant, model_version=model_version, dataset_version_id=golden,
        artifact_sha256=model_version.sha256,
    )  # fmt: skip
    # Already deployed to staging, and requested for it again.
    promotion = PromotionRequest.objects.create(
        tenant=tenant, model_version=model_version, target="staging",
        artifact_sha256=model_version.sha256, status="awaiting_approval",
        requested_by=scientist.user,
    )  # fmt: skip
    production = None
    for environment in ("staging", "production"):
        production = Deployment.objects.create(
            tenant=tenant, model_version=model_version, environment=environment,
            artifact_sha256=model_version.sha256, status="warm",
        )  # fmt: skip
    assert production is not None
    granted = grants.access_request_create(
        actor=fuzzer.user, tenant=tenant, dataset=version.dataset, dataset_version=version,
        purpose="fuzz the granted-data routes",
    )  # fmt: skip
    grants.access_request_grant(actor=reviewer.user, request=granted)
    pending = grants.access_request_create(
        actor=scientist.user, tenant=tenant, dataset=version.dataset, purpose="to decide on"
    )
    sweep = training.sweep_launch(
        actor=scientist.user, tenant=tenant, dataset_version=version, base_model="tiny-bert",
        base_params={}, grid={"epochs": [1, 2]}, metric="val_macro_f1", goal="max",
    )  # fmt: skip
    shared = datasets.dataset_create(
        actor=fuzzer.user, tenant=None, kind="golden", name="banking-shared", domain="banking",
        task="text-classification",
    )  # fmt: skip
    notebook = NotebookServer.objects.create(
        tenant=tenant, user=fuzzer.user, hub_user=fuzzer.user.username, server_name="nb-fuzz"
    )
    spare = token_create(user=fuzzer.user, name="spare").token  # one the fuzzer may revoke
    # A retrieval version: its knowledge base has a download of its own.
    faq = knowledge_base(tenant, "faq", count=3)
    # A warm autocomplete model: complete is called past its checks (no fleet: a 503).
    replies = register_autocomplete(tenant, "replies", None, reply_version(tenant))
    Deployment.objects.create(
        tenant=tenant, model_version=replies, environment="production",
        artifact_sha256=replies.sha256, status="warm",
    )  # fmt: skip
    # A campaign over the tenant (its items list, cancel and decisions have an id to take).
    from apps.campaigns import services as campaigns

    campaign = campaigns.campaign_create(
        actor=fuzzer.user, name="fuzz", model_name="intents", selection={"tenants": "all"},
        recipe={"last": True}, target="staging",
    )  # fmt: skip
    # A batch prediction (queued: its output answers 409 until it succeeded).
    from apps.batch.models import BatchPrediction

    batch = BatchPrediction.objects.create(
        tenant=tenant, model_version=model_version, dataset_version=version,
        artifact_sha256=model_version.sha256, text_column="text",
    )  # fmt: skip
    return {
        "batch_id": batch.pk,
        "campaign_id": campaign.pk,
        "dataset_id": version.dataset_id,
        "version": version.pk,
        "version_id": version.pk,
        "run_id": model_version.run_id,
        "sweep_id": sweep.pk,
        "evaluation_id": evaluation.pk,
        "promotion_id": promotion.pk,
        "deployment_id": production.pk,
        "request_id": pending.pk,
        "notebook_id": notebook.pk,
        "name": model_version.registered_model.name,
        "number": model_version.number,
        "model_kind": "classifier",
        "username": scientist.user.username,
        "token_id": spare.pk,
        "shared-dataset_id": shared.pk,
        "retrieval-dataset_id": faq.dataset_id,
        "retrieval-version": faq.pk,
        "autocomplete-name": replies.registered_model.name,
    }


def with_examples(schema: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    """The schema with the seeded ids as its path parameters' examples: schemathesis's
    examples phase calls every operation once with ids that exist."""
    for path, item in schema["paths"].items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                name = parameter["name"]
                if parameter["in"] != "path":
                    continue
                if path.startswith("/api/v1/shared-datasets/"):
                    name = f"shared-{name}"
                elif "/documents/" in path:  # only a retrieval version has documents
                    name = f"retrieval-{name}"
                elif path.endswith("/complete"):  # only an autocomplete model completes
                    name = f"autocomplete-{name}"
                if name in ids:
                    parameter["example"] = ids[name]
    return schema


class Web:
    """gunicorn on the test database; the fleet and JupyterHub are nowhere."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "web.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "ARTIFACT_STORE": settings.ARTIFACT_STORE,
            "UPLOAD_TMP_DIR": str(settings.UPLOAD_TMP_DIR),
            "WORKBENCH_VAR_DIR": str(tmp / "var"),
            # Tasks the API enqueues wait in a broker of their own: no worker takes them.
            "CELERY_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.sqlite3'}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.sqlite3'}",
            "JUPYTERHUB_URL": f"http://127.0.0.1:{free_port()}",
            "JUPYTERHUB_API_TOKEN": "",
            "DEBUG": "false",
            "PYTHONPATH": str(ROOT),
        }
        # No Ray, no hub token, and nothing that would point the private broker at a Redis.
        for key in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST", "DJANGO_SETTINGS_MODULE",
                    "REDIS_PASSWORD", "REDIS_PASSWORD_FILE",
                    "JUPYTERHUB_API_TOKEN_FILE"):  # fmt: skip
            env.pop(key, None)
        command = [str(BIN / "gunicorn"), "-c", "workbench/gunicorn_conf.py", "--workers", "1",
                   "--bind", f"127.0.0.1:{self.port}", "--timeout", "120",
                   # No request-line limit: gunicorn's own 400 for a line past 8 KiB is
                   # HTML from the HTTP server, before the API; the API is fuzzed here.
                   "--limit-request-line", "0", "workbench.wsgi"]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_for(self.healthy, timeout=90, every=0.3)
        except Exception:
            self.stop()
            raise

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def schemathesis_config(schema: dict[str, Any], *, token: str, tenant: str) -> str:
    lines = [
        f'headers = {{ Authorization = "Bearer {token}" }}',
        # The first catalogue read of a fresh web process imports torch: seconds, on a
        # loaded 2-core machine more than schemathesis's default 10.
        "request-timeout = 60.0",
        f"phases.fuzzing.generation.max-examples = {MAX_EXAMPLES}",
        # Methods a path does not take, sent to every path: OPTIONS (it once failed with a
        # 500), one no route knows, one some routes take.
        'phases.coverage.unexpected-methods = ["options", "trace", "patch"]',
        # Sequences that follow the links: enough of them to walk every id to its users.
        f"phases.stateful.generation.max-examples = {STATEFUL_SCENARIOS}",
        f"phases.stateful.max-steps = {STATEFUL_STEPS}",
        "[parameters]",
        f'"path.tenant" = "{tenant}"',
    ]
    # A documented 503 (the fleet or JupyterHub not answering) is an answer, not a crash:
    # those operations alone may give it, and status_code_conformance holds the rest.
    for item in schema["paths"].values():
        for operation in item.values():
            if "503" in operation.get("responses", {}):
                lines += [
                    "[[operations]]",
                    f'include-operation-id = "{operation["operationId"]}"',
                    'checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]',
                ]
    return "\n".join(lines) + "\n"


def operation_patterns(schema: dict[str, Any]) -> dict[tuple[str, re.Pattern[str]], str]:
    found = {}
    for path, item in schema["paths"].items():
        pattern = re.compile("^" + re.sub(r"{[^}]+}", "[^/]+", path) + "$")
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                found[(method.upper(), pattern)] = f"{method.upper()} {path}"
    return found


def answered(log: str, schema: dict[str, Any]) -> dict[str, Counter[int]]:
    """Per operation, the statuses the server answered it with (from gunicorn's access log)."""
    patterns = operation_patterns(schema)
    by_operation: dict[str, Counter[int]] = {name: Counter() for name in patterns.values()}
    for method, path, status in ACCESS_LINE.findall(log):
        for (m, pattern), name in patterns.items():
            if m == method and pattern.match(path):
                by_operation[name][int(status)] += 1
                break
    return by_operation


# A seed whose walk reached every operation and passed (issue 12's runs).
CI_SEED = 1517426986


def test_the_api_survives_a_fuzzer_and_keeps_to_its_schema(
    worker_database_url: str, artifacts_dir: Path, tmp_path: Path, tenant: Tenant,
    scientist: Actor, reviewer: Actor,
):  # fmt: skip
    fuzzer = make_actor("fuzzer", tenant, Role.ADMIN, is_staff=True)  # the only admin
    ids = seed(tenant, fuzzer, scientist, reviewer)
    web = Web(tmp_path, worker_database_url)
    try:
        with urllib.request.urlopen(f"{web.url}/api/v1/schema/?format=json") as response:
            schema = json.loads(response.read())
        schema_file = tmp_path / "openapi.json"
        schema_file.write_text(json.dumps(with_examples(json.loads(json.dumps(schema)), ids)))
        fuzz_seed = int(
            os.environ.get("FUZZ_SEED")
            or (CI_SEED if os.environ.get("CI") else secrets.randbelow(2**31))
        )
        report_dir = tmp_path / "report"
        config = tmp_path / "schemathesis.toml"
        config.write_text(schemathesis_config(schema, token=fuzzer.token, tenant=tenant.slug))
        command = [str(BIN / "schemathesis"), "--config-file", str(config), "run",
                   str(schema_file), "--url", web.url,
                   "--checks", ",".join(CHECKS), "--workers", "1",
                   "--seed", str(fuzz_seed), "--report", "junit",
                   "--report-dir", str(report_dir), "--no-color"]  # fmt: skip
        started = time.monotonic()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",  # it keeps its own token and account
            "FUZZ_OWN_TOKEN_ID": ApiToken.objects.get(user=fuzzer.user, name="fuzzer-test").pk,
            "FUZZ_OWN_USERNAME": fuzzer.user.username,
        }
        run = subprocess.run(
            command, cwd=str(tmp_path), env=env, capture_output=True, text=True,
            timeout=FUZZ_TIMEOUT_S,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:
        web.stop()
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.out").write_text(output)
    statuses = answered(web.log(), schema)
    requests = len(ACCESS_LINE.findall(web.log()))
    reached = sorted(name for name, c in statuses.items() if any(s != 404 for s in c))
    with_2xx = [name for name, c in statuses.items() if any(200 <= s < 300 for s in c)]
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", output)
    followed = f"{links[1]} of {links[2]} links followed" if links else "no links followed"
    print(
        f"schemathesis (seed {fuzz_seed}): {len(statuses)} operations, {requests} requests "
        f"in {took:.0f} s; {len(reached)} operations answered other than 404, "
        f"{len(with_2xx)} with a 2xx; stateful phase: {followed}"
    )
    server_errors = {n: c for n, c in statuses.items() if any(s >= 500 and s != 503 for s in c)}
    assert server_errors == {}, output[-6000:]
    junit = next(report_dir.glob("*.xml"), None)
    assert junit is not None, output[-6000:]
    failures = [
        f"{case.get('name')}: {(problem.get('message') or problem.text or '')[:500]}"
        for case in ElementTree.parse(junit).iter("testcase")  # noqa: S314 - written by us
        for problem in [*case.iter("failure"), *case.iter("error")]
    ]
    assert failures == [], "\n".join(failures) + "\n" + output[-3000:]
    assert run.returncode == 0, output[-6000:]
    never = [name for name, c in statuses.items() if not c]
    assert never == [], f"operations the fuzzer never called: {never}"
    unreached = sorted(set(statuses) - set(reached))
    assert unreached == [], f"operations answered nothing but 404: {unreached}"
