"""The embedding training loop: :func:`train_embedder`, the retrieval counterpart of
:func:`worker.training.loop.train` (same arguments, callbacks and result).

A run tunes LoRA adapters on the shared MiniLM (:class:`~worker.embeddings.TrainableEmbedder`)
on (query, document) pairs with in-batch negatives, as sentence-transformers'
MultipleNegativesRankingLoss: each query's positive is its own document, every other
document of the batch a negative, and the loss is the cross-entropy over 20 x the cosine
similarities. A batch never holds two pairs of the same document (the other would be a
false negative): an epoch's shuffled pairs are dealt into batches greedily, each pair into
the first batch that lacks its document, so the plan is a function of (seed, epoch) and a
resume recomputes it.

Validation, at each epoch end: the held-out queries (distinct queries, see
:func:`~worker.retrieval_data.split_queries`) ranked against ALL documents of the knowledge
base and measured with :mod:`worker.retrieval`, the one definition of each metric. The best
epoch by ``val_mrr_at_10`` is kept (it separates epochs that recall@5 often ties on a small
knowledge base), and early stopping watches it too.

Everything else is the classifier loop's: the reporting thread and throttled reports, the
optimizer and schedule, seeding and deterministic kernels, checkpoints (the model directory
in a checkpoint is an embedding model directory), bit-identical resumes on CPU, cancel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from worker import retrieval
from worker.adapters import base_tokenizer
from worker.embeddings import TrainableEmbedder, document_text, load_embedder, write_embedder_dir
from worker.modeling import collate, encode
from worker.retrieval_data import (
    Document,
    Pair,
    check_pairs,
    read_documents,
    read_pairs,
    relevant_sets,
    split_queries,
)
from worker.training import checkpoint
from worker.training.checkpoint import LoopState
from worker.training.config import DataSpec, TrainConfig
from worker.training.data import DataError
from worker.training.loop import (
    RESUME_MUST_MATCH,
    Optimization,
    StopReason,
    TrainResult,
    _Cancelled,
    deterministic_algorithms,
    seed_everything,
)
from worker.training.reporting import Background, Callbacks, Reporter

logger = logging.getLogger(__name__)

# sentence-transformers' MultipleNegativesRankingLoss default: logits are 20 x cosine.
SCALE = 20.0
MONITOR = "val_mrr_at_10"
EPOCH_METRICS = (
    "val_recall_at_1",
    "val_recall_at_5",
    "val_recall_at_10",
    "val_mrr_at_10",
    "val_ndcg_at_10",
)
RANKED = 10  # ids per validation query kept in the result
EMBEDDING_RESUME_MUST_MATCH = (*RESUME_MUST_MATCH, "separate_encoders", "document_fields")


def plan_batches(order: list[int], documents: list[int], batch_size: int) -> list[list[int]]:
    """Pair indices in ``order`` dealt into batches of at most ``batch_size`` with distinct
    documents (``documents[i]`` is pair i's): each into the first open batch without its
    document, else a new one; batches of one pair are left out."""
    batches: list[list[int]] = []
    held: list[set[int]] = []
    first_open = 0
    for index in order:
        document = documents[index]
        for b in range(first_open, len(batches)):
            if len(batches[b]) < batch_size and document not in held[b]:
                batches[b].append(index)
                held[b].add(document)
                break
        else:
            batches.append([index])
            held.append({document})
        while first_open < len(batches) and len(batches[first_open]) >= batch_size:
            first_open += 1
    # A lone pair has no negative to learn from (its loss is 0): it waits for the next epoch.
    return [batch for batch in batches if len(batch) > 1]


def train_embedder(
    config: TrainConfig,
    train_data: DataSpec,
    *,
    validation_data: DataSpec | None,
    work_dir: Path,
    callbacks: Callbacks,
    resume_dir: Path | None = None,
) -> TrainResult:
    """Train an embedding model of ``config.base_model`` on ``train_data``'s pairs and
    documents (``documents_path``); return the best epoch's model directory.

    ``validation_data``: pairs to validate on (its own ``documents_path``, or the training
    documents); None holds out ``validation_split`` of the distinct queries. Raises as
    :func:`worker.training.loop.train` does.
    """
    errors = config.validate()
    if errors:
        raise ValueError(f"invalid training config: {errors}")
    if not config.is_embedding():
        raise ValueError(f"{config.base_model!r} is not an embedding base model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work_dir.mkdir(parents=True, exist_ok=True)
    logger.info("training an embedding model on %s: %s", device, config.to_dict())
    with (
        deterministic_algorithms(enabled=device == "cpu"),
        Background(callbacks.on_reporting_thread_exit) as background,
    ):
        return _train(
            config, train_data, validation_data, work_dir, callbacks, resume_dir, device, background
        )


def _documents(spec: DataSpec) -> list[Document]:
    if spec.documents_path is None:
        raise DataError(f"{spec.path.name}: retrieval pairs need their documents file")
    return read_documents(spec.documents_path, spec.documents_format)


def _data_digest(pairs: list[Pair], documents: list[Document]) -> str:
    """What a resume must train on: the training pairs and documents, hashed."""
    content = json.dumps(
        [[[p.query, p.document_id] for p in pairs], [[d.id, d.title, d.text] for d in documents]]
    )
    return hashlib.sha256(content.encode()).hexdigest()


def _train(
    config: TrainConfig,
    train_data: DataSpec,
    validation_data: DataSpec | None,
    work_dir: Path,
    callbacks: Callbacks,
    resume_dir: Path | None,
    device: str,
    background: Background,
) -> TrainResult:
    reporter = Reporter(callbacks, config, background)
    saved = checkpoint.read_state(resume_dir) if resume_dir is not None else None
    reporter.phase("loading", LoopState(**saved["loop"]) if saved is not None else LoopState())
    seed_everything(config.seed)

    # -- data: the knowledge base, the pairs, the held-out queries ---------------------------
    documents = _documents(train_data)
    pairs = read_pairs(train_data)
    check_pairs(pairs, documents, name=train_data.path.name)
    if validation_data is not None:
        val_pairs = read_pairs(validation_data)
        val_documents = _documents(validation_data) if validation_data.documents_path else documents
        check_pairs(val_pairs, val_documents, name=validation_data.path.name)
        train_pairs = pairs
    else:
        train_pairs, val_pairs = split_queries(pairs, config.validation_split, config.seed)
        val_documents = documents
    fields = config.resolved_document_fields()
    digest = _data_digest(train_pairs, documents)

    # -- model: built fresh, or loaded from the checkpoint ------------------------------------
    best_dir = work_dir / "model"
    if resume_dir is None:
        shutil.rmtree(best_dir, ignore_errors=True)
        model = TrainableEmbedder(
            base_model=config.base_model,
            lora=config.lora(),
            max_length=config.max_length,
            separate=config.separate_encoders,
            document_fields=fields,
        )
    else:
        assert saved is not None  # read above, for the first report
        _check_resumable(saved, config, digest)
        model = TrainableEmbedder.from_dir(resume_dir / "model")
        shutil.rmtree(best_dir, ignore_errors=True)
        if (resume_dir / "best").is_dir():
            checkpoint.copy_tree(resume_dir / "best", best_dir)
    model.to(device)

    tokenizer = base_tokenizer(config.base_model, max_length=config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    position = {d.id: i for i, d in enumerate(documents)}
    doc_ids = encode(
        tokenizer, [document_text(d.text, d.title, fields) for d in documents], config.max_length
    )
    query_ids = encode(tokenizer, [p.query for p in train_pairs], config.max_length)
    pair_documents = [position[p.document_id] for p in train_pairs]
    val_queries, val_relevant = relevant_sets(val_pairs)
    val_query_ids = encode(tokenizer, val_queries, config.max_length)
    val_doc_ids = encode(
        tokenizer,
        [document_text(d.text, d.title, fields) for d in val_documents],
        config.max_length,
    )
    val_doc_names = [d.id for d in val_documents]

    # Every epoch's batches, known up front: the schedule needs the total number of steps.
    plans = [
        plan_batches(
            torch.randperm(
                len(train_pairs),
                generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
            ).tolist(),
            pair_documents,
            config.batch_size,
        )
        for epoch in range(1, config.epochs + 1)
    ]
    total_steps = sum(len(plan) for plan in plans)
    if total_steps == 0:
        raise DataError("the training pairs need at least two distinct documents")

    # -- optimizer, schedule, mixed precision ------------------------------------------------
    optimization, state = Optimization.start(model, config, device, total_steps, saved)
    resumed_from_step = state.step if saved is not None else None
    reporter.total_steps = total_steps
    schedule = checkpoint.Schedule(config.checkpoint_every_steps, config.checkpoint_min_seconds)

    def save_checkpoint() -> None:
        reporter.flush_losses(state)
        background.drain()  # one checkpoint in flight
        step = state.step
        meta, query, document = model.snapshot()
        building = checkpoint.stage(work_dir, step=step, best_dir=best_dir)
        training_state = checkpoint.detached_copy(
            {
                "loop": asdict(state),
                **optimization.state_dict(),
                "rng": checkpoint.rng_state(),
                "config": config.to_dict(),
                "data_sha256": digest,
            }
        )

        def save_model(directory: Path) -> None:
            write_embedder_dir(directory, meta=meta, query=query, document=document)

        def write_and_hand_over() -> None:
            written = checkpoint.complete(
                work_dir, building, save_model=save_model, state=training_state
            )
            callbacks.on_checkpoint(written, step)

        background.submit(
            f"the checkpoint at step {step}", write_and_hand_over, skip_when_stopping=True
        )
        schedule.written()

    def validate() -> dict[str, float]:
        model.train(False)
        documents_vectors = _embed(
            model, val_doc_ids, "document", pad_id, device, config, callbacks
        )
        query_vectors = _embed(model, val_query_ids, "query", pad_id, device, config, callbacks)
        model.train()
        ranked = retrieval.search(query_vectors, documents_vectors, val_doc_names, RANKED)
        found = retrieval.metrics([r.ids for r in ranked], val_relevant)
        return {f"val_{name}": value for name, value in found.items()}

    targets_cache: dict[int, torch.Tensor] = {}
    try:
        while state.epoch < config.epochs and not state.stop_reason:
            epoch = state.epoch + 1
            plan = plans[epoch - 1]
            model.train()
            reporter.phase("training", state)
            # A mid-epoch resume skips the batches this epoch already trained on.
            for batch_index in range(state.step_in_epoch, len(plan)):
                if callbacks.should_stop():
                    raise _Cancelled
                background.check()
                rows = plan[batch_index]
                queries = {
                    k: v.to(device)
                    for k, v in collate([query_ids[i] for i in rows], pad_id).items()
                }
                positives = {
                    k: v.to(device)
                    for k, v in collate([doc_ids[pair_documents[i]] for i in rows], pad_id).items()
                }
                targets = targets_cache.setdefault(
                    len(rows), torch.arange(len(rows), device=device)
                )
                with optimization.autocast():
                    q = model(**queries, role="query")
                    d = model(**positives, role="document")
                loss = F.cross_entropy(SCALE * (q.float() @ d.float().t()), targets)
                optimization.step(loss, model)
                state.step += 1
                state.step_in_epoch += 1
                reporter.step_done(state, loss.detach(), len(rows))
                if state.step_in_epoch < len(plan) and schedule.due(state.step):
                    save_checkpoint()

            # -- epoch end: validate, keep the best, decide on early stopping, checkpoint ----
            reporter.flush_losses(state)
            reporter.phase("validating", state)
            metrics = validate()
            metrics["train_loss"] = state.epoch_loss_sum / max(state.epoch_loss_steps, 1)
            reporter.epoch_metrics(state, epoch, metrics, names=EPOCH_METRICS)
            state.epoch, state.step_in_epoch = epoch, 0
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
            reporter.phase("saving", state)
            if metrics[MONITOR] > state.best_metric:
                state.best_metric, state.best_epoch = metrics[MONITOR], epoch
                state.best_metrics = metrics
                state.epochs_without_improvement = 0
                _save_best(best_dir, model)
            else:
                state.epochs_without_improvement += 1
                if config.patience and state.epochs_without_improvement >= config.patience:
                    state.stop_reason = "early_stopping"
                    state.stop_detail = (
                        f"{MONITOR} did not improve for {state.epochs_without_improvement} "
                        f"epochs (best {state.best_metric:.4f} at epoch {state.best_epoch})"
                    )
            save_checkpoint()
    except _Cancelled:
        background.stopping = True
        reporter.flush_metrics()
        background.drain()
        return _result(
            "cancelled",
            f"cancelled at step {state.step} (epoch {state.epoch + 1})",
            state,
            best_dir,
            [],
            resumed_from_step,
            device,
            train_pairs,
            val_pairs,
        )

    # -- done: rank the validation queries with the saved best model, as serving will -------
    reporter.phase("saving", state)
    predictions = _validation_rankings(best_dir, val_queries, val_relevant, val_documents, device)
    reporter.flush_metrics()
    background.drain()
    stop_reason: StopReason = "early_stopping" if state.stop_reason else "completed"
    return _result(
        stop_reason,
        state.stop_detail
        or f"completed {state.epoch} epochs (best {MONITOR} {state.best_metric:.4f} "
        f"at epoch {state.best_epoch})",
        state,
        best_dir,
        predictions,
        resumed_from_step,
        device,
        train_pairs,
        val_pairs,
    )


def _result(
    stop_reason: StopReason,
    detail: str,
    state: LoopState,
    best_dir: Path,
    predictions: list[dict[str, Any]],
    resumed_from_step: int | None,
    device: str,
    train_pairs: list[Pair],
    val_pairs: list[Pair],
) -> TrainResult:
    return TrainResult(
        stop_reason=stop_reason,
        stop_detail=detail,
        best_epoch=state.best_epoch,
        metrics=dict(state.best_metrics),
        model_dir=best_dir,
        validation_predictions=predictions,
        steps=state.step,
        resumed_from_step=resumed_from_step,
        device=device,
        labels=[],
        train_rows=len(train_pairs),
        validation_rows=len(val_pairs),
    )


@torch.no_grad()
def _embed(
    model: TrainableEmbedder,
    ids: list[list[int]],
    role: str,
    pad_id: int,
    device: str,
    config: TrainConfig,
    callbacks: Callbacks,
) -> Any:
    """Normalised float32 vectors of tokenised texts (batched by length, order kept)."""
    import numpy as np

    out = np.zeros((len(ids), int(model.meta()["dim"])), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    size = max(config.batch_size, 32)
    for start in range(0, len(order), size):
        if callbacks.should_stop():
            raise _Cancelled
        rows = order[start : start + size]
        batch = {k: v.to(device) for k, v in collate([ids[i] for i in rows], pad_id).items()}
        out[rows] = model(**batch, role=role).float().cpu().numpy()
    return retrieval.normalise(out)


def _validation_rankings(
    best_dir: Path,
    queries: list[str],
    relevant: list[set[str]],
    documents: list[Document],
    device: str,
) -> list[dict[str, Any]]:
    """Per validation query: its relevant ids, the best model's top ids and the first hit."""
    if not (best_dir / "embedder.json").is_file():
        return []
    embedder = load_embedder(best_dir, device=device)
    ranked = retrieval.search(
        embedder.encode(queries, role="query"),
        embedder.encode_documents(documents),
        [d.id for d in documents],
        RANKED,
    )
    return [
        {
            "query": query,
            "document_ids": sorted(wanted),
            "ranked": r.ids,
            "scores": r.scores,
            "rank": retrieval.first_hit(r.ids, wanted),
        }
        for query, wanted, r in zip(queries, relevant, ranked, strict=True)
    ]


def _save_best(best_dir: Path, model: TrainableEmbedder) -> None:
    # Written beside and swapped in: the old files may be hard-linked into a checkpoint.
    building = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    model.save(building)
    shutil.rmtree(best_dir, ignore_errors=True)
    building.rename(best_dir)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, digest: str) -> None:
    before = saved["config"]
    changed = [
        name for name in EMBEDDING_RESUME_MUST_MATCH if before.get(name) != getattr(config, name)
    ]
    if changed:
        raise ValueError(f"cannot resume: the checkpoint's run had other {', '.join(changed)}")
    if saved.get("data_sha256") != digest:
        raise ValueError("cannot resume: the training pairs or documents differ")


__all__ = ["EPOCH_METRICS", "MONITOR", "SCALE", "plan_batches", "train_embedder"]
