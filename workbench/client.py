"""The workbench from inside a notebook: granted data, training runs, uploads.

    from workbench.client import Workbench
    wb = Workbench()                      # URL, token and tenant from the server's env
    wb.datasets()                         # the dataset versions you were granted
    rows = wb.load("dv_...")              # download (sha256 checked) and parse
    run = wb.launch_run("dv_...", params={"epochs": 1})   # the default base model
    wb.export_version("support-intents", 3, "model.tar")  # a standalone merged model
    wb.search("faq-search", "how do I reset my password?", k=5)["results"]

Standard library only, and no Django: this module runs in notebook kernels, which may not
have the workbench installed (copy this file next to the notebook). Every refusal by the
workbench becomes a ``WorkbenchError`` carrying its status and message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINISHED_RUN = ("succeeded", "failed", "cancelled")


class WorkbenchError(Exception):
    """The workbench refused a call (``status`` is the HTTP status) or could not be reached
    (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GrantedDataset:
    id: str
    dataset: str
    name: str
    number: int
    sha256: str
    rows: int
    size_bytes: int
    format: str
    # A retrieval version's knowledge base ("" and 0 for classification data).
    documents_sha256: str = ""
    documents_count: int = 0
    # The columns the rows are read by (a reply corpus's label_column is its context
    # column, "" without one) and the version's figures (retrieval, text-generation).
    text_column: str = ""
    label_column: str = ""
    profile: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name} v{self.number} ({self.id}, {self.rows} rows)"


class Workbench:
    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        tenant: str | None = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        self.url = (url or os.environ.get("WORKBENCH_URL", "")).rstrip("/")
        self.token = token or os.environ.get("WORKBENCH_TOKEN", "")
        self.tenant = tenant or os.environ.get("WORKBENCH_TENANT", "")
        self.timeout = timeout
        missing = [
            name
            for name, value in (
                ("WORKBENCH_URL", self.url),
                ("WORKBENCH_TOKEN", self.token),
                ("WORKBENCH_TENANT", self.tenant),
            )
            if not value
        ]
        if missing:
            raise WorkbenchError(
                0,
                "not_configured",
                f"{', '.join(missing)} not set: start the notebook from the workbench, or pass "
                "url=, token= and tenant=.",
            )

    # --- plumbing -------------------------------------------------------------------------

    def _tenant_path(self, path: str) -> str:
        return f"/api/v1/tenants/{urllib.parse.quote(self.tenant)}/{path}"

    def _open(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)  # noqa: S310 - the workbench URL
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise _error(exc) from None
        except urllib.error.URLError as exc:
            raise WorkbenchError(
                0, "unreachable", f"The workbench at {self.url} does not answer: {exc.reason}"
            ) from None

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        with self._open(method, path, body, "application/json" if body else "") as response:
            return json.loads(response.read() or b"null")

    def _pages(self, path: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            sep = "&" if "?" in path else "?"
            data = self._json("GET", f"{path}{sep}page={page}")
            found.extend(data["results"])
            if not data.get("next"):
                return found
            page += 1

    # --- data ------------------------------------------------------------------------------

    def datasets(self) -> list[GrantedDataset]:
        """The dataset versions a reviewer granted you in this tenant."""
        return [
            GrantedDataset(
                id=row["id"],
                dataset=row["dataset"],
                name=row["dataset_name"],
                number=row["number"],
                sha256=row["sha256"],
                rows=row["rows"],
                size_bytes=row["size_bytes"],
                format=row["format"],
                documents_sha256=row.get("documents_sha256", ""),
                documents_count=row.get("documents_count", 0),
                text_column=row.get("text_column", ""),
                label_column=row.get("label_column", ""),
                profile=row.get("profile") or {},
            )
            for row in self._pages(self._tenant_path("granted-data/"))
        ]

    def attached(self) -> list[str]:
        """The dataset version ids this notebook was started with."""
        return [v for v in os.environ.get("WORKBENCH_DATASETS", "").split(",") if v]

    def download(
        self,
        version_id: str,
        path: str | os.PathLike[str] | None = None,
        *,
        documents: bool = False,
    ) -> Path:
        """Save a granted version's file (``documents``: a retrieval version's knowledge
        base) and check its sha256; refused if not granted."""
        name = f"{version_id}-documents" if documents else version_id
        target = Path(path) if path is not None else Path(tempfile.gettempdir()) / name
        quoted = urllib.parse.quote(version_id)
        route = f"granted-data/{quoted}/{'documents/' if documents else ''}download"
        return self._save(self._tenant_path(route), target, what=name)

    def _save(self, route: str, target: Path, *, what: str) -> Path:
        """Stream a download to ``target``, checking the sha256 the workbench sends."""
        digest = hashlib.sha256()
        with self._open("GET", route) as response:
            expected = response.headers.get("X-Content-SHA256", "")
            partial = target.with_name(target.name + ".partial")
            with partial.open("wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if expected and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise WorkbenchError(0, "corrupt", f"{what}: the download's sha256 differs")
        partial.replace(target)
        return target

    def load(self, version_id: str, *, documents: bool = False) -> list[dict[str, Any]]:
        """A granted version's rows, as dicts (CSV or JSON lines); ``documents``: a
        retrieval version's knowledge base (id, text, title) instead of its pairs."""
        with tempfile.TemporaryDirectory() as tmp:
            saved = self.download(version_id, Path(tmp) / "data", documents=documents)
            data = saved.read_text(encoding="utf-8-sig")
        if data.lstrip().startswith("{"):
            return [json.loads(line) for line in data.splitlines() if line.strip()]
        return list(csv.DictReader(io.StringIO(data)))

    def request_access(self, dataset_id: str, purpose: str, version: str | None = None) -> Any:
        """Ask for a dataset (or one version); a reviewer grants or denies it."""
        payload = {"dataset": dataset_id, "version": version, "purpose": purpose}
        return self._json("POST", self._tenant_path("data-access/"), payload)

    def upload(
        self,
        dataset_id: str,
        path: str | os.PathLike[str],
        *,
        documents: str | os.PathLike[str] | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        context_column: str | None = None,
    ) -> Any:
        """Upload a file as a new (immutable) version of one of the tenant's datasets.

        A retrieval dataset's version is its pairs (``path``: a query and a document-id
        column, by default ``query`` and ``document_id``) with the knowledge base they point
        into (``documents``: columns ``id``, ``text`` and optionally ``title``). A
        text-generation dataset's version is a reply corpus: a ``text`` column and the
        message each reply answers, ``context_column`` (default ``context``, taken when the
        file has it). Columns not named are the dataset task's defaults (``text`` and
        ``label`` for classification)."""
        boundary = uuid.uuid4().hex
        fields = {
            "text_column": text_column,
            "label_column": label_column,
            "context_column": context_column,
        }
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
            if v is not None
        ]
        files = {"file": Path(path), "documents": Path(documents) if documents else None}
        for name, source in files.items():
            if source is not None:
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="{source.name}"\r\nContent-Type: application/octet-stream'
                    "\r\n\r\n".encode()
                    + source.read_bytes()
                    + b"\r\n"
                )
        parts.append(f"--{boundary}--\r\n".encode())
        path_ = self._tenant_path(f"datasets/{urllib.parse.quote(dataset_id)}/versions/")
        with self._open(
            "POST", path_, b"".join(parts), f"multipart/form-data; boundary={boundary}"
        ) as response:
            return json.loads(response.read())

    # --- models ----------------------------------------------------------------------------

    def export_version(
        self, model: str, number: int, path: str | os.PathLike[str] | None = None
    ) -> Path:
        """Save a model version as a standalone merged model (a tar: the adapter merged
        into its base, or the full model as it is) and check its sha256; the tar's path."""
        name = f"{model}-v{number}-merged.tar"
        target = Path(path) if path is not None else Path(tempfile.gettempdir()) / name
        route = f"models/{urllib.parse.quote(model)}/versions/{int(number)}/export"
        return self._save(self._tenant_path(route), target, what=f"{model} v{number}")

    # --- serving ---------------------------------------------------------------------------

    def embed(
        self,
        model: str,
        inputs: str | list[str],
        *,
        role: str = "query",
        environment: str = "production",
    ) -> Any:
        """Embed texts with an embedding model's warm deployment: ``role`` "query" (the
        query encoder) or "document". The answer's ``embeddings`` hold one L2-normalised
        vector (``dim`` floats) per input, in order."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        route = self._tenant_path(f"models/{urllib.parse.quote(model)}/embed")
        payload = {"inputs": texts, "role": role, "environment": environment}
        return self._json("POST", route, payload)

    def search(self, model: str, query: str, *, k: int = 5, environment: str = "production") -> Any:
        """The ``k`` (1..100) documents of the deployment's knowledge base nearest to
        ``query``: the answer's ``results`` are ``{"document_id", "title", "score"}``, best
        first."""
        route = self._tenant_path(f"models/{urllib.parse.quote(model)}/search")
        payload = {"query": query, "k": int(k), "environment": environment}
        return self._json("POST", route, payload)

    def complete(
        self,
        model: str,
        prefix: str,
        *,
        context: str = "",
        max_tokens: int = 16,
        n: int = 1,
        strategy: str = "greedy",
        session: str | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        environment: str = "production",
    ) -> Any:
        """Complete an agent's reply with an autocomplete model's warm deployment: the
        answer's ``completions`` are ``{"text", "score"}`` (``text``: what follows
        ``prefix``, up to the end of a sentence or ``max_tokens`` tokens), best first;
        greedy (deterministic) by default, ``"beam"`` or ``"top_k"`` (``top_k``, ``seed``)
        on request. Pass the same ``session`` id for the calls of one typing session: a
        call extending the previous one reuses its cache (``cached_tokens``)."""
        route = self._tenant_path(f"models/{urllib.parse.quote(model)}/complete")
        payload: dict[str, Any] = {
            "prefix": prefix,
            "context": context,
            "max_tokens": int(max_tokens),
            "n": int(n),
            "strategy": strategy,
            "environment": environment,
        }
        if session is not None:
            payload["session"] = session
        if top_k is not None:
            payload["top_k"] = int(top_k)
        if seed is not None:
            payload["seed"] = int(seed)
        return self._json("POST", route, payload)

    def reindex(self, deployment_id: str, dataset_version: str) -> Any:
        """Index another knowledge base (a retrieval dataset version) into a warm embedding
        deployment without retraining (202, a reviewer's call): the current index serves
        until the new one is loaded and verified; follow ``staged_dataset_version`` and
        ``index_dataset_version`` on the deployment."""
        route = self._tenant_path(f"deployments/{urllib.parse.quote(deployment_id)}/reindex")
        return self._json("POST", route, {"dataset_version": dataset_version})

    # --- training --------------------------------------------------------------------------

    def launch_run(
        self,
        dataset_version: str,
        *,
        base_model: str | None = None,
        params: dict[str, Any] | None = None,
        validation_version: str | None = None,
        model_name: str = "",
    ) -> Any:
        """Queue a training run on granted data (202); follow it with ``run``/``wait``.

        Without ``base_model`` the workbench picks its default (the LoRA adapter base where
        installed); parameters not named get that base's defaults."""
        payload: dict[str, Any] = {
            "dataset_version": dataset_version,
            "params": params or {},
            "model_name": model_name,
        }
        if base_model:
            payload["base_model"] = base_model
        if validation_version:
            payload["validation_version"] = validation_version
        return self._json("POST", self._tenant_path("runs/"), payload)

    def run(self, run_id: str) -> Any:
        return self._json("GET", self._tenant_path(f"runs/{urllib.parse.quote(run_id)}/"))

    def wait(self, job_id: str, *, timeout: float = 3600, every: float = 5) -> Any:
        """Poll a run, or a batch prediction (``bp_...``), until it finishes; its final
        state (the last one seen at ``timeout``)."""
        follow = self.batch if job_id.startswith("bp_") else self.run
        deadline = time.monotonic() + timeout
        while True:
            state = follow(job_id)
            if state["status"] in FINISHED_RUN or time.monotonic() > deadline:
                return state
            time.sleep(every)

    # --- batch predictions -----------------------------------------------------------------

    def batch_predict(
        self,
        dataset_version: str,
        *,
        model: str = "",
        environment: str = "production",
        model_version: str = "",
        text_column: str = "",
        output_format: str = "",
        top_k: int = 3,
        role: str = "",
        context_column: str | None = None,
        max_tokens: int = 16,
        completions: int = 1,
    ) -> Any:
        """Score every row of a dataset version with a model (202): the version of ``model``
        in ``environment``, or ``model_version`` by id. A classifier writes labels
        (``top_k`` per row), an embedding model vectors (``role``'s encoder; ``.npy`` unless
        ``output_format`` says parquet or jsonl), an autocomplete model ``completions``
        completions of each row's text (``context_column``: the messages replied to).
        Follow it with ``batch``/``wait``, then ``batch_output``/``batch_rows``/
        ``batch_vectors``."""
        payload: dict[str, Any] = {
            "dataset_version": dataset_version,
            "model": model,
            "environment": environment,
            "model_version": model_version,
            "text_column": text_column,
            "output_format": output_format,
            "top_k": top_k,
            "role": role,
            "context_column": context_column,
            "max_tokens": max_tokens,
            "completions": completions,
        }
        return self._json("POST", self._tenant_path("batch-predictions/"), payload)

    def batch(self, job_id: str) -> Any:
        route = f"batch-predictions/{urllib.parse.quote(job_id)}/"
        return self._json("GET", self._tenant_path(route))

    def batch_output(self, job_id: str, path: str | os.PathLike[str] | None = None) -> Path:
        """Save a succeeded batch prediction's output, checking its sha256."""
        state = self.batch(job_id)
        name = f"{job_id}.{state['output_format']}"
        target = Path(path) if path is not None else Path(tempfile.gettempdir()) / name
        route = f"batch-predictions/{urllib.parse.quote(job_id)}/output"
        return self._save(self._tenant_path(route), target, what=name)

    def batch_rows(self, job_id: str) -> list[dict[str, Any]]:
        """A succeeded batch prediction's output rows (JSON lines or CSV): a classifier's
        (row, text, label, score, top_k), an autocomplete model's (row, prefix, context,
        completion, score, tokens, completions), an embedding model's in JSON lines (row,
        text, vector); ``batch_vectors`` reads .npy and Parquet."""
        state = self.batch(job_id)
        if state["output_format"] not in ("jsonl", "csv"):
            raise WorkbenchError(
                400, "not_rows", f"a {state['output_format']} output: use batch_vectors"
            )
        with tempfile.TemporaryDirectory() as tmp:
            saved = self.batch_output(job_id, Path(tmp) / "output")
            text = saved.read_text(encoding="utf-8")
        if state["output_format"] == "csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            nested = "completions" if state.get("model_kind") == "autocomplete" else "top_k"
            for row in rows:
                row[nested] = json.loads(row[nested])
            return rows
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def batch_vectors(self, job_id: str) -> Any:
        """A succeeded embedding job's vectors as a float32 numpy array (rows x dim, row i
        the dataset's row i), from whichever format it wrote."""
        import numpy as np

        state = self.batch(job_id)
        with tempfile.TemporaryDirectory() as tmp:
            saved = self.batch_output(job_id, Path(tmp) / f"output.{state['output_format']}")
            if state["output_format"] == "npy":
                return np.load(saved)
            if state["output_format"] == "parquet":
                import pyarrow.parquet as pq

                column = pq.read_table(saved, columns=["vector"]).column("vector")
                return np.asarray(column.to_pylist(), dtype=np.float32).reshape(-1, state["dim"])
            lines = saved.read_text(encoding="utf-8").splitlines()
            return np.asarray([json.loads(x)["vector"] for x in lines if x.strip()], np.float32)


def _error(exc: urllib.error.HTTPError) -> WorkbenchError:
    try:
        body = json.loads(exc.read() or b"{}")
        error = body.get("error") or {}
        return WorkbenchError(
            exc.code, str(error.get("code", "error")), str(error.get("message", exc.reason))
        )
    except ValueError:
        return WorkbenchError(exc.code, "error", str(exc.reason))
