"""What the autocomplete benchmarks share: the SGD reply corpora read in place from the
shared datasets folder, text-generation dataset versions uploaded through the datasets
service, tiny-gpt2 runs trained by the workbench's own runner, a version's artifact loaded
as a ``worker.autocomplete.Completer`` in this process, and the word-boundary positions of a
reply that next-word accuracy is measured at. The throwaway workbench itself (Django on
SQLite, a private local Ray head, gunicorn) is ``benchmarks._embedding.Bench``."""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT
from benchmarks._embedding import Bench, csv_bytes
from worker.reply_data import Reply

SGD = Path(os.environ.get("SGD_REPLIES_DIR", ROOT.parent / "shared" / "datasets" / "sgd-replies"))
SERVICES = ("banks_1", "hotels_2", "rentalcars_1", "restaurants_1", "services_1")
# torch intra-op threads of a replica (Ray: OMP_NUM_THREADS=1 for fractional-CPU actors):
# the in-process side runs as a replica does.
REPLICA_THREADS = 1


def read_replies(service: str, split: str) -> list[Reply]:
    """``split`` (train / val / test) of one SGD service, blank replies skipped."""
    with (SGD / service / f"{split}.csv").open(encoding="utf-8-sig", newline="") as fh:
        return [
            Reply(r["text"], r.get("context") or "")
            for r in csv.DictReader(fh)
            if (r.get("text") or "").strip()
        ]


@dataclass(frozen=True)
class Position:
    """A reply typed up to a word boundary: the prefix typed, the word that comes next."""

    prefix: str
    context: str
    word: str


def positions(replies: Sequence[Reply]) -> Iterator[Position]:
    """Every word boundary of every reply after its first word, as the evaluation counts
    them (``worker.autocomplete_eval.boundary_prefixes``): the reply typed up to the end of
    word ``i - 1`` and word ``i``, the customer's message as context."""
    from worker.autocomplete_eval import boundary_prefixes

    for reply in replies:
        for prefix, word in boundary_prefixes(reply.text):
            if prefix:
                yield Position(prefix, reply.context.strip(), word)


class AutocompleteBench(Bench):
    """``Bench`` with reply corpora and tiny-gpt2 runs."""

    def reply_version(self, name: str, replies: Sequence[Reply], *, kind: str = "training") -> Any:
        """A text-generation dataset version (columns text, context) uploaded through the
        datasets service; a golden set by the reviewer (who alone may write yardsticks)."""
        from django.conf import settings

        from apps.datasets.services import UploadedFile, dataset_create, dataset_version_create

        actor = self.scientist if kind == "training" else self.reviewer
        dataset = dataset_create(
            actor=actor.user, tenant=self.tenant, name=name, kind=kind, task="text-generation",
        )  # fmt: skip
        data = csv_bytes(["context", "text"], [[r.context, r.text] for r in replies])
        path = Path(tempfile.mkdtemp(dir=settings.UPLOAD_TMP_DIR)) / f"{name}.csv"
        path.write_bytes(data)  # the store moves it in
        upload = UploadedFile(path, hashlib.sha256(data).hexdigest(), len(data), path.name)
        return dataset_version_create(
            actor=actor.user, dataset=dataset, path=upload.path,
            sha256=upload.sha256, size_bytes=upload.size_bytes, filename=upload.filename,
            text_column="text",
        ).version  # fmt: skip

    def train_autocomplete(
        self, version: Any, model_name: str, given: dict[str, Any]
    ) -> tuple[Any, float]:
        """A tiny-gpt2 run with the catalogue's defaults under ``given`` through the
        workbench's runner: (the registered version, wall seconds)."""
        from worker import base_models

        return self.train(version, model_name, given, base_model=base_models.TINY_GPT2)

    def evaluate(self, model_version: Any, golden: Any) -> Any:
        """The version evaluated on ``golden`` by the evaluation task's body in this process
        (what a worker runs; the Celery hops stubbed out): the Evaluation, whose samples the
        deployment's warm-up compares with and whose metrics (the model's and the trigram's,
        on a capped sample) are reported beside the benchmark's own."""
        from apps.evaluation import services as evaluations
        from apps.evaluation.models import Evaluation
        from apps.evaluation.tasks import run_evaluation

        evaluations._send = lambda evaluation_id: None
        evaluations._enqueue_promotion_checks = lambda: None
        (evaluation,) = evaluations.evaluation_request(
            actor=self.scientist.user, tenant=self.tenant, model_version=model_version,
            dataset_versions=[golden],
        )  # fmt: skip
        status = run_evaluation(evaluation.pk)
        evaluation = Evaluation.objects.get(pk=evaluation.pk)
        if status != "succeeded":
            raise RuntimeError(f"evaluation {evaluation.pk} ended {status}: {evaluation.error}")
        return evaluation

    def register_dir(self, model_dir: Path, data: Any, name: str) -> Any:
        """A model directory written here (not by a run) packed as a run packs it and
        registered as an autocomplete version trained on ``data``."""
        from apps.training.packaging import pack_dir
        from tests.autocomplete_helpers import PackedCompleter, register_autocomplete

        tar = model_dir.parent / "model.tar"
        sha256, size = pack_dir(model_dir, tar)
        packed = PackedCompleter(model_dir=model_dir, tar=tar, sha256=sha256, size=size)
        return register_autocomplete(self.tenant, name, packed, data, trainer=self.scientist.user)

    def completer(self, model_version: Any) -> Any:
        """The version's artifact, read back from the artifact store and loaded in this
        process the way a replica loads it."""
        from apps.core.artifacts import get_store
        from apps.training.packaging import unpack
        from worker.autocomplete import load_completer

        work = Path(tempfile.mkdtemp(dir=self.var))
        tar = work / "model.tar"
        with get_store().open(model_version.artifact_key) as stored, tar.open("wb") as out:
            while chunk := stored.read(1 << 20):
                out.write(chunk)
        return load_completer(unpack(tar, work / "model"))


def random_completer(directory: Path, replies: Sequence[Reply], *, seed: int = 0) -> Any:
    """The catalogue's tiny-gpt2 shape with random weights: its tokenizer learnt on
    ``replies`` (context + text, as a run learns it), written as a version's artifact is
    and loaded back. For timing only: what a trained model says is not this one's."""
    import torch

    from worker import autocomplete

    texts = [t for r in replies for t in (r.context, r.text) if t]
    tokenizer = autocomplete.train_tokenizer(texts)
    torch.manual_seed(seed)
    model = autocomplete.build_model(autocomplete.gpt2_config(tokenizer.get_vocab_size()))
    autocomplete.write_completer_dir(directory, model, tokenizer, autocomplete.new_meta(tokenizer))
    return autocomplete.load_completer(directory)


def can_train() -> str:
    """'' when the catalogue has tiny-gpt2 and the runner can train it; else why not."""
    try:
        from worker import base_models

        base_models.get(base_models.TINY_GPT2)
        import worker.training.autocomplete_loop  # noqa: F401
    except (ImportError, AttributeError, KeyError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""
