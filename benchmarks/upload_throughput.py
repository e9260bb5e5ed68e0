"""Dataset upload throughput: the real server against ``sha256sum`` on the same file.

    .venv/bin/python benchmarks/upload_throughput.py            # full: ~500 MB, 3 reps, recorded
    .venv/bin/python benchmarks/upload_throughput.py --quick    # CI smoke: 20 MB, 1 rep

Builds a CSV (text,label) from the banking77 training rows (each text gets a counter, so
texts differ), starts gunicorn on a fresh ``WORKBENCH_VAR_DIR`` (own SQLite, artifacts,
upload dir), and then, interleaved A B A B:

* A: a streaming multipart upload (1 MiB chunks, Content-Length up front) to
  ``POST /api/v1/tenants/<slug>/datasets/<id>/versions/``; request start -> full response;
* B: ``sha256sum`` of the same file, the floor for "read every byte once and hash it".

Every repetition changes one byte in the last row, so each upload is a new version (201).
While an upload runs, a thread samples the RSS of the whole gunicorn process tree every
20 ms; the kernel's per-process high-water marks (VmHWM) are read as a cross-check.

``--stages`` also loads ``benchmarks/upload_stages_gunicorn.py`` into gunicorn, which times
the server-side steps (multipart parse, scan, pyarrow pass, duplicate count, store) of
each upload, and prints their medians.

The full run prepends its table, with machine facts, to ``benchmarks/README.md`` (newest
first); ``--quick`` records only with ``--record``. Temp files and the server are removed
at exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import http.client
import importlib.util
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (
    README,
    RESULTS_MARKER,
    Process,
    add_record_flags,
    commit,
    cpu_model,
    free_port,
    gpu,
    launch,
    mem_total_gib,
    process_tree,
    record,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = ROOT / "benchmarks" / "out"
STAGES_CONFIG = ROOT / "benchmarks" / "upload_stages_gunicorn.py"
WEB_CONFIG = ROOT / "workbench" / "gunicorn_conf.py"
BANKING77 = Path(
    os.environ.get(
        "BANKING77_TRAIN_CSV", ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"
    )
)

MB = 1_000_000
CHUNK = 1024 * 1024
THROUGHPUT_TARGET = 0.5  # upload MB/s >= 0.5 x sha256sum MB/s
RSS_TARGET_MB = 300.0
SAMPLE_INTERVAL_S = 0.02
MARKER_DIGITS = 6
# Settings the server must not inherit from this shell: it gets its own var dir for all of it.
SERVER_ENV_DROP = (
    "DATABASE_URL",
    "ARTIFACT_STORE",
    "UPLOAD_TMP_DIR",
    "CELERY_BROKER_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "WORKBENCH_MODE",
    "DJANGO_SETTINGS_MODULE",
)


# --- the data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchFile:
    path: Path
    size: int
    rows: int
    marker_offset: int  # where the last row's repetition digits start

    def set_marker(self, value: int) -> None:
        """Rewrite the last row's digits in place: same size, different bytes and hash."""
        digits = f"{value:0{MARKER_DIGITS}d}".encode()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, digits, self.marker_offset)
        finally:
            os.close(fd)


def _csv_field(value: str) -> tuple[str, str]:
    """Opening and closing text for a CSV field that will get more text appended."""
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""'), '"'
    return value, ""


def build_csv(path: Path, target_bytes: int) -> BenchFile:
    """Write a CSV of about ``target_bytes``: banking77 rows repeated, each text numbered."""
    with BANKING77.open(encoding="utf-8", newline="") as fh:
        source = [(row["text"], row["category"]) for row in csv.DictReader(fh)]
    if not source:
        raise SystemExit(f"no rows in {BANKING77}")
    # line = prefix + counter + suffix, pre-encoded so the loop only formats an integer.
    templates: list[tuple[bytes, bytes]] = []
    for text, label in source:
        opened, closing = _csv_field(text + " #")
        label_open, label_close = _csv_field(label)
        templates.append((opened.encode(), f"{closing},{label_open}{label_close}\n".encode()))
    header = b"text,label\n"
    marker_prefix = b"benchmark repetition marker "
    marker_line_len = len(marker_prefix) + MARKER_DIGITS + len(b",card_arrival\n")
    rows = 0
    written = len(header)
    with path.open("wb") as out:
        out.write(header)
        while written + marker_line_len < target_bytes:
            batch = [b"%s%d%s" % (pre, rows + i, post) for i, (pre, post) in enumerate(templates)]
            for line in batch:
                if written + marker_line_len >= target_bytes:
                    break
                out.write(line)
                written += len(line)
                rows += 1
        marker_offset = written + len(marker_prefix)
        out.write(marker_prefix + b"0" * MARKER_DIGITS + b",card_arrival\n")
        written += marker_line_len
        rows += 1
    return BenchFile(path=path, size=written, rows=rows, marker_offset=marker_offset)


# --- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    port: int
    tenant: str
    dataset: str
    token: str


SETUP_CODE = """
import json
from apps.datasets.services import dataset_create
from apps.tenants import services as ts
from apps.tenants.models import Role

user = ts.user_create(username="bench", password={password})
tenant = ts.tenant_create(actor=None, slug="bench", name="Upload benchmark")
ts.membership_add(actor=None, tenant=tenant, user=user, role=Role.SCIENTIST)
secret = ts.token_create(user=user, name="upload-benchmark").secret
dataset = dataset_create(actor=user, tenant=tenant, name="banking77-large", kind="training",
                         task="text-classification")
print("BENCH-SETUP " + json.dumps({{"tenant": tenant.slug, "dataset": str(dataset.pk),
                                    "token": secret}}))
"""


class Server:
    """gunicorn with one sync worker on a private var dir, stopped with its whole group."""

    def __init__(self, var_dir: Path, *, stages: bool = False) -> None:
        self.var_dir = var_dir
        self.log_path = var_dir / "server.log"
        self.stages_path = var_dir / "stages.jsonl" if stages else None
        self.env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_DROP}
        self.env.update(
            {
                "WORKBENCH_VAR_DIR": str(var_dir),
                "PROMETHEUS_MULTIPROC_DIR": str(var_dir / "prometheus"),
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.stages_path is not None:
            self.env["UPLOAD_STAGES_LOG"] = str(self.stages_path)
        self.process: Process | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def _manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def prepare(self) -> Target:
        self._manage("migrate", "--no-input")
        code = SETUP_CODE.format(password=json.dumps(secrets.token_urlsafe(24)))
        for line in self._manage("shell", "-c", code).splitlines():
            if line.startswith("BENCH-SETUP "):
                facts = json.loads(line.removeprefix("BENCH-SETUP "))
                break
        else:
            raise RuntimeError("the setup script printed no BENCH-SETUP line")
        self.port = free_port()
        return Target(self.port, facts["tenant"], facts["dataset"], facts["token"])

    def start(self) -> None:
        command = [
            str(BIN / "gunicorn"),
            "workbench.wsgi:application",
            "-b",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--timeout",
            "600",
        ]
        # The production config (with its request-body read fix); --stages adds timers to it.
        command += ["-c", str(STAGES_CONFIG if self.stages_path is not None else WEB_CONFIG)]
        self.process = Process("gunicorn", command, self.env, self.log_path)
        self.process.start()
        self.proc = self.process.proc
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200 and len(process_tree(self.proc.pid)) > 1:
                        return
                finally:
                    conn.close()
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not answer /healthz within 60 s:\n{self.log_tail()}")

    def last_stages(self) -> dict[str, float]:
        """Step timings of the last POST, when started with ``stages``."""
        if self.stages_path is None or not self.stages_path.exists():
            return {}
        lines = self.stages_path.read_text(encoding="utf-8").splitlines()
        record = json.loads(lines[-1]) if lines else {}
        return {k: float(v) for k, v in record.items() if k != "path"}

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


# --- memory -------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB; 0 once the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def tree_rss_mb(pids: Sequence[int]) -> float:
    return sum(_status_kb(pid, "VmRSS:") for pid in pids) / 1024


class RssSampler:
    """Peak summed RSS of a process tree, sampled in a thread every ``interval`` seconds."""

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.root = root
        self.interval = interval
        self.peak_mb = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = process_tree(self.root)
        refreshed = time.monotonic()
        while True:
            self.peak_mb = max(self.peak_mb, tree_rss_mb(pids))
            self.samples += 1
            if self._stop.wait(self.interval):
                return
            if time.monotonic() - refreshed > 1.0:  # a restarted worker would be a new pid
                pids, refreshed = process_tree(self.root), time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the two measured operations ----------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    seconds: float
    status: int
    body: dict[str, object]
    peak_rss_mb: float


def _multipart_body(bench: BenchFile, boundary: str) -> tuple[int, Iterator[bytes]]:
    head = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in (("text_column", "text"), ("label_column", "label"))
        )
        + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{bench.path.name}"\r\nContent-Type: text/csv\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with bench.path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield tail

    return len(head) + bench.size + len(tail), chunks()


def upload(target: Target, bench: BenchFile, server_pid: int) -> Upload:
    boundary = "bench-" + secrets.token_hex(16)
    length, body = _multipart_body(bench, boundary)
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=900)
    path = f"/api/v1/tenants/{target.tenant}/datasets/{target.dataset}/versions/"
    headers = {
        "Authorization": f"Bearer {target.token}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(length),
        "Accept": "application/json",
    }
    try:
        with RssSampler(server_pid) as sampler:
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            seconds = time.perf_counter() - started
    finally:
        conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = {"raw": raw[:500].decode(errors="replace")}
    return Upload(seconds, response.status, parsed, sampler.peak_mb)


def sha256sum(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout.split()[0]


# --- reporting ----------------------------------------------------------------------------


@dataclass
class Results:
    size: int
    rows: int
    upload_s: list[float] = field(default_factory=list)
    sha_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    idle_rss_mb: float = 0.0
    hwm_sum_mb: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end
    stages: list[dict[str, float]] = field(default_factory=list)


def _span(values: Sequence[float], fmt: str = ".0f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(res: Results) -> tuple[str, bool]:
    up = [res.size / MB / s for s in res.upload_s]
    ref = [res.size / MB / s for s in res.sha_s]
    # Each upload against the sha256sum run right after it: the pairs share the noise.
    ratios = [sha / upload for upload, sha in zip(res.upload_s, res.sha_s, strict=True)]
    ratio = statistics.median(ratios)
    ratio_text = f"{ratio:.2f}x" + (
        f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    )
    peak = max(max(res.peak_rss_mb), res.hwm_sum_mb)
    rss_ratio = peak / res.idle_rss_mb if res.idle_rss_mb else float("nan")
    ok_tp, ok_rss = ratio >= THROUGHPUT_TARGET, peak < RSS_TARGET_MB
    rows = [
        "| figure | project | reference | ratio | target | met? |",
        "|---|---|---|---|---|---|",
        f"| upload throughput, {res.size / MB:.0f} MB CSV (MB/s) | {_span(up, '.1f')} "
        f"| sha256sum {_span(ref, '.1f')} | {ratio_text} | ≥ {THROUGHPUT_TARGET}x "
        f"| {'yes' if ok_tp else 'no'} |",
        f"| server peak RSS during upload, process tree (MB) | {peak:.0f} "
        f"| idle server {res.idle_rss_mb:.0f} | {rss_ratio:.1f}x | < {RSS_TARGET_MB:.0f} MB "
        f"| {'yes' if ok_rss else 'no'} |",
    ]
    return "\n".join(rows), ok_tp and ok_rss


def _stage_names() -> list[str]:
    """The step names, in order, from the gunicorn config that records them."""
    spec = importlib.util.spec_from_file_location("upload_stages_gunicorn", STAGES_CONFIG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [step for _, _, step in module.STEPS]


def stage_table(res: Results) -> str:
    """Median seconds per server-side step, as a share of the whole request."""
    if not res.stages:
        return ""
    steps = _stage_names()
    total = statistics.median(r["total"] for r in res.stages)
    top = [s for s in steps if not s.startswith(" ")]
    other = statistics.median(r["total"] - sum(r.get(s, 0.0) for s in top) for r in res.stages)
    rows = ["| server-side step | seconds (median) | share |", "|---|---|---|"]
    for step in [*steps, "other (auth, DB, response)"]:
        if step in steps:
            seconds = statistics.median(r.get(step, 0.0) for r in res.stages)
        else:
            seconds = other
        name = step.strip() if not step.startswith(" ") else "↳ " + step.strip()
        rows.append(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    rows.append(f"| whole request (server) | {total:.2f} | 100% |")
    return "\n".join(rows)


def machine_facts() -> list[str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        f"CPU: {cpu_model()}, {usable} usable of {cores} cores",
        f"memory: {mem_total_gib():.1f} GiB",
        f"GPU: {gpu()} (this benchmark is CPU-only)",
        f"OS: {platform.platform()}; Python {platform.python_version()}",
    ]


def report(res: Results, *, reps: int, commit: str, when: str) -> tuple[str, bool]:
    body, ok = table(res)
    raw_up = ", ".join(f"{s:.2f}" for s in res.upload_s)
    raw_sha = ", ".join(f"{s:.2f}" for s in res.sha_s)
    raw_rss = ", ".join(f"{m:.0f}" for m in res.peak_rss_mb)
    notes = [
        f"file: {res.size:,} bytes, {res.rows:,} rows (banking77 train texts, numbered); "
        f"{reps} repetition{'s' if reps != 1 else ''} interleaved A B, median (min-max)",
        f"upload seconds per rep: {raw_up}; sha256sum seconds per rep: {raw_sha}",
        f"peak RSS sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms per rep (MB): {raw_rss}; "
        f"sum of per-process VmHWM after the run: {res.hwm_sum_mb:.0f} MB (the larger is reported)",
        "ratio: median over the reps of (upload MB/s / sha256sum MB/s) in the same rep",
        "server: gunicorn, 1 sync worker, SQLite + local artifact store on a fresh var dir; "
        "client and server on the same machine; warm-up upload and page cache before timing",
        f"1-minute load average at start / end: {res.load[0]:.2f} / {res.load[1]:.2f} "
        "(the machine is shared)",
        *machine_facts(),
    ]
    text = (
        f"### upload_throughput — {when} — commit {commit}\n\n"
        f"{body}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    )
    if stages := stage_table(res):
        text += f"\nWhere the server's time goes (`--stages`):\n\n{stages}\n"
    return text, ok


README_INTRO = f"""# Benchmarks

Each benchmark compares the project with a reference measured in the same run, interleaved
(A B A B), and quotes the median with min-max; see `/work/shared/BENCHMARKS.md`. Figures come
from the full run; `--quick` is a smoke test for CI and records nothing unless `--record`.
The machine facts and the load average are recorded with each entry: the machines are shared.

| benchmark | command | what it measures |
|---|---|---|
| `upload_throughput.py` | `.venv/bin/python benchmarks/upload_throughput.py` (about 1 min; \
`--quick` for CI; `--stages` adds where the server's time goes, through the gunicorn hooks in \
`upload_stages_gunicorn.py`) | a ~500 MB CSV (banking77 rows) uploaded to the real server \
(gunicorn, 1 worker) against `sha256sum` of the same file: throughput (target ≥ 0.5x \
sha256sum) and the peak RSS of the server's process tree (target < 300 MB) |

## Results

{RESULTS_MARKER}
"""


def run(args: argparse.Namespace) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="upload-throughput-", dir=OUT))
    server = Server(work / "var", stages=args.stages)
    try:
        print(f"building a {args.size_mb} MB CSV from {BANKING77} ...", flush=True)
        bench = build_csv(work / "banking77-large.csv", args.size_mb * MB)
        warm = build_csv(work / "banking77-warmup.csv", 256 * 1024)
        print(f"  {bench.size:,} bytes, {bench.rows:,} rows", flush=True)

        print("starting the server (migrate, setup, gunicorn) ...", flush=True)
        target = server.prepare()
        server.start()
        assert server.proc is not None
        pid = server.proc.pid

        # Warm-up, not measured: the worker's first upload imports pyarrow; sha256sum pulls
        # the big file into the page cache so both sides read it from memory.
        first = upload(target, warm, pid)
        if first.status != 201:
            raise RuntimeError(f"warm-up upload answered {first.status}: {first.body}")
        sha256sum(bench.path)
        time.sleep(0.5)
        res = Results(size=bench.size, rows=bench.rows, idle_rss_mb=tree_rss_mb(process_tree(pid)))
        load_start = os.getloadavg()[0]

        for rep in range(1, args.reps + 1):
            bench.set_marker(rep)
            os.sync()  # flush the last round's dirty pages outside the timed windows
            up = upload(target, bench, pid)
            if up.status != 201:
                raise RuntimeError(f"upload {rep} answered {up.status}, expected 201: {up.body}")
            os.sync()
            sha_s, digest = sha256sum(bench.path)
            if up.body.get("sha256") != digest or up.body.get("rows") != bench.rows:
                raise RuntimeError(
                    f"server recorded sha256={up.body.get('sha256')} rows={up.body.get('rows')}, "
                    f"expected {digest} and {bench.rows} rows"
                )
            res.upload_s.append(up.seconds)
            res.sha_s.append(sha_s)
            res.peak_rss_mb.append(up.peak_rss_mb)
            if stages := server.last_stages():
                res.stages.append(stages)
            print(
                f"  rep {rep}: upload {up.seconds:.2f} s ({bench.size / MB / up.seconds:.1f} MB/s, "
                f"peak RSS {up.peak_rss_mb:.0f} MB) | sha256sum {sha_s:.2f} s "
                f"({bench.size / MB / sha_s:.1f} MB/s)",
                flush=True,
            )
            # The stored copy is not needed: free the disk before the next round.
            shutil.rmtree(server.var_dir / "artifacts" / "datasets", ignore_errors=True)

        res.hwm_sum_mb = sum(_status_kb(p, "VmHWM:") for p in process_tree(pid)) / 1024
        res.load = (load_start, os.getloadavg()[0])
        entry, ok = report(
            res,
            reps=args.reps,
            commit=commit(),
            when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
        print("\n" + entry)
        if args.record:
            record(entry, intro=README_INTRO)
            print(f"recorded in {README.relative_to(ROOT)}")
        print("targets met" if ok else "target NOT met")
        return 0
    except Exception:
        if server.proc is not None:
            print(f"--- server log tail ---\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 MB, 1 repetition (CI smoke)")
    parser.add_argument(
        "--size-mb", type=int, help="file size in MB (default 500; 20 with --quick)"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="time the server-side steps of each upload (gunicorn hooks)",
    )
    add_record_flags(parser)
    args = parser.parse_args(argv)
    args.size_mb = args.size_mb or (20 if args.quick else 500)
    args.reps = args.reps or (1 if args.quick else 3)
    return launch(parser, args, run, data=BANKING77)


if __name__ == "__main__":
    sys.exit(main())
