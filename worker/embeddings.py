"""Per-tenant embedding models: LoRA encoders on the shared MiniLM, trained, stored, served.

An embedding model turns texts into L2-normalised vectors (mean of the token states, as
all-MiniLM-L6-v2 is meant to be used), so that a query's nearest documents by cosine are
the ones that answer it. A tenant's model is a LoRA adapter on the shared base: one for
queries and documents alike, or with ``separate`` encoders one for each role. Its directory
(and the artifact tar made of it) holds only what the tenant adds:

- ``embedder.json``: ``kind`` ("embedding"), ``format`` ("adapter"), the base it adapts
  (catalogue id, weights name, sha256 of the weights file), ``lora`` (``r``, ``alpha``,
  ``dropout``, ``target_modules``), ``max_length``, ``pooling`` ("mean"), ``separate``,
  ``dim`` and ``document_fields`` (how a document's title and text become the text that is
  embedded: every caller goes through :meth:`Embedder.document_text`);
- ``query.safetensors``: per adapted linear layer ``<module path>.lora_A`` (r x in) and
  ``<module path>.lora_B`` (out x r), module paths as in ``BertModel``, as adapters store
  theirs (:mod:`worker.adapters`);
- ``document.safetensors``: the document encoder's, only when ``separate``.

Training (:class:`TrainableEmbedder`) wraps the base in peft's LoRA. Serving, evaluation
and the deployment's index (:class:`Embedder`) run the factors on this process's one
:class:`~worker.adapters.SharedBase`, the copy of the base that classifier adapters use
too: a replica holds MiniLM once for every tenant of either kind. The un-tuned base
(:func:`base_embedder`) is the same code with no factors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from worker import adapters, base_models
from worker.adapters import AdapterError, SharedBase, lora_factors, mean_pool, shared_base
from worker.retrieval import normalise

EMBEDDER_CONFIG = "embedder.json"
QUERY_WEIGHTS = "query.safetensors"
DOCUMENT_WEIGHTS = "document.safetensors"
KIND = "embedding"
ROLES = ("query", "document")
# How a document becomes the text its vector is made of. "text": the body alone; "title_text":
# the title, a newline, the body. Measured on stackfaq test (the base and the tuned default):
# see the catalogue entry; the choice is recorded in each model so that training, evaluation,
# the deployment's index and search embed documents the same way.
DOCUMENT_FIELDS = base_models.DOCUMENT_FIELDS
DEFAULT_DOCUMENT_FIELDS = str(
    base_models.get(base_models.MINILM_L6_EMBED).defaults()["document_fields"]
)
ENCODE_BATCH = 64


class HasText(Protocol):
    """A document as :mod:`worker.retrieval_data` reads it (``title`` may be empty)."""

    @property
    def text(self) -> str: ...

    @property
    def title(self) -> str: ...


def document_text(text: str, title: str, fields: str) -> str:
    """The text a document is embedded as, for ``fields`` (one of :data:`DOCUMENT_FIELDS`)."""
    if fields == "text" or not title.strip():
        return text
    if fields == "title_text":
        return f"{title}\n{text}"
    raise ValueError(f"unknown document_fields {fields!r}; one of {', '.join(DOCUMENT_FIELDS)}")


def is_embedder_dir(path: Path) -> bool:
    return (path / EMBEDDER_CONFIG).is_file()


# --- serving and evaluation: LoRA factors on the shared base ---------------------------


class _Encoder:
    """One role's LoRA factors in the shape :class:`SharedBase` runs adapters in (``B``
    pre-scaled by alpha / r); no factors at all is the base itself."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], *, r: int, alpha: float, sha256: str, device: str
    ) -> None:
        self.rank = r
        self.base_sha256 = sha256
        self.factors = lora_factors(tensors, r=r, alpha=alpha, device=device)
        expected = {f"{m}.lora_{x}" for m in self.factors for x in "AB"}
        if unexpected := sorted(set(tensors) - expected):
            raise AdapterError(f"encoder has unexpected tensors: {', '.join(unexpected[:5])}")
        self.weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())


class Embedder:
    """A loaded embedding model: :meth:`encode` texts as a query or as documents."""

    def __init__(
        self,
        *,
        meta: dict[str, Any],
        base: SharedBase,
        query: _Encoder,
        document: _Encoder | None,
    ) -> None:
        self.meta = meta
        self.base = base
        self.base_model = str(meta["base_model"])
        self.base_sha256 = str(meta["base_sha256"])
        self.max_length = int(meta["max_length"])
        self.separate = document is not None
        self.document_fields = str(meta.get("document_fields", "text"))
        document_text("", "", self.document_fields)  # an unknown choice fails here
        self.dim = int(base.encoder.config.hidden_size)
        self._encoders = {"query": query, "document": document or query}
        # What the tenant adds to a replica that holds the base: the LoRA tensors.
        self.weight_bytes = query.weight_bytes + (document.weight_bytes if document else 0)

    @property
    def device(self) -> str:
        return self.base.device

    def document_text(self, document: HasText) -> str:
        """The text ``document`` is embedded as by this model."""
        return document_text(document.text, document.title, self.document_fields)

    def encode_documents(
        self, documents: Sequence[HasText], *, batch_size: int = ENCODE_BATCH
    ) -> np.ndarray:
        """Documents (with ``text`` and ``title``) through the document encoder."""
        texts = [self.document_text(d) for d in documents]
        return self.encode(texts, role="document", batch_size=batch_size)

    @torch.inference_mode()
    def encode(
        self, texts: list[str], *, role: str = "query", batch_size: int = ENCODE_BATCH
    ) -> np.ndarray:
        """float32 (len(texts), dim), each row L2-normalised; ``role`` "query" or "document".

        Rows are batched by length (less padding), then put back in the order given.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        from worker.modeling import collate

        encoder = self._encoders[role]
        ids = self.base.encode(texts, self.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {
                k: v.to(self.device)
                for k, v in collate([ids[i] for i in rows], self.base.pad_id).items()
            }
            # The base's own pass for adapters (its LoRA layers given this encoder's factors,
            # then mean pooling): an _Encoder has the factors, rank and base sha256 an
            # Adapter has, and no head, which the embedding does not need.
            with self.base.lock:
                pooled = self.base._pooled(
                    cast(Any, [encoder]),
                    torch.zeros(len(rows), dtype=torch.long, device=self.device),
                    batch,
                )
            out[rows] = pooled.cpu().numpy()
        return normalise(out)


def _read_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise AdapterError(f"{EMBEDDER_CONFIG} is not JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise AdapterError(f"{EMBEDDER_CONFIG} does not describe an embedding model")
    return meta


def read_meta(directory: Path) -> dict[str, Any]:
    return _read_meta((directory / EMBEDDER_CONFIG).read_bytes())


def load_embedder_files(files: Mapping[str, bytes], *, device: str = "cpu") -> Embedder:
    """From the raw bytes of ``embedder.json``, ``query.safetensors`` and, for separate
    encoders, ``document.safetensors`` (what a replica unpacks from the artifact).

    Raises :class:`~worker.adapters.AdapterError` (a ValueError) for a malformed model or
    one made for other base weights than this host holds.
    """
    try:
        meta = _read_meta(files[EMBEDDER_CONFIG])
        adapters._check_base(meta)
        lora = meta["lora"]
        r, alpha = int(lora["r"]), float(lora["alpha"])
        if r < 1:
            raise AdapterError("LoRA rank must be >= 1")
        sha = str(meta["base_sha256"])
        query = _Encoder(
            load_safetensors(files[QUERY_WEIGHTS]), r=r, alpha=alpha, sha256=sha, device=device
        )
        document = None
        if meta.get("separate"):
            document = _Encoder(
                load_safetensors(files[DOCUMENT_WEIGHTS]),
                r=r,
                alpha=alpha,
                sha256=sha,
                device=device,
            )
    except AdapterError:
        raise
    except KeyError as error:
        raise AdapterError(f"embedding model lacks {error.args[0]}") from error
    except Exception as error:  # bad safetensors header, wrong types in the config
        raise AdapterError(f"unreadable embedding model: {error}") from error
    return Embedder(
        meta=meta,
        base=shared_base(str(meta["base_model"]), device=device),
        query=query,
        document=document,
    )


def load_embedder(directory: Path, *, device: str = "cpu") -> Embedder:
    """The embedding model saved in ``directory``, on this process's shared base."""
    names = [EMBEDDER_CONFIG, QUERY_WEIGHTS]
    if (directory / DOCUMENT_WEIGHTS).is_file():
        names.append(DOCUMENT_WEIGHTS)
    try:
        files = {n: (directory / n).read_bytes() for n in names}
    except FileNotFoundError as error:
        raise AdapterError(f"embedding model lacks {Path(error.filename).name}") from error
    return load_embedder_files(files, device=device)


def base_embedder(
    base_model: str = base_models.MINILM_L6_EMBED,
    *,
    max_length: int,
    device: str = "cpu",
    document_fields: str = DEFAULT_DOCUMENT_FIELDS,
) -> Embedder:
    """The un-tuned base, mean pooled and normalised: the champion when there is none."""
    entry = base_models.get(base_model)
    if entry.format != base_models.FORMAT_ADAPTER:
        raise AdapterError(f"{base_model!r} is not an adapter base model")
    meta = {
        "kind": KIND,
        "format": base_models.FORMAT_ADAPTER,
        "base_model": base_model,
        "base": entry.base,
        "base_sha256": base_models.base_sha256(base_model),
        "lora": None,
        "max_length": max_length,
        "pooling": "mean",
        "separate": False,
        "document_fields": document_fields,
    }
    sha = str(meta["base_sha256"])
    query = _Encoder({}, r=1, alpha=1.0, sha256=sha, device=device)
    return Embedder(
        meta=meta, base=shared_base(base_model, device=device), query=query, document=None
    )


def embedder_bytes(directory: Path) -> int:
    """Bytes of what the tenant adds (the LoRA tensors of each encoder)."""
    total = 0
    for name in (QUERY_WEIGHTS, DOCUMENT_WEIGHTS):
        if (directory / name).is_file():
            tensors = load_safetensors((directory / name).read_bytes())
            total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


def write_embedder_dir(
    directory: Path,
    *,
    meta: dict[str, Any],
    query: Mapping[str, torch.Tensor],
    document: Mapping[str, torch.Tensor] | None,
) -> None:
    """Write an embedding model directory (created): config and one file per encoder."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: t.detach().to("cpu").contiguous() for n, t in query.items()},
        str(directory / QUERY_WEIGHTS),
    )
    if document is not None:
        save_file(
            {n: t.detach().to("cpu").contiguous() for n, t in document.items()},
            str(directory / DOCUMENT_WEIGHTS),
        )
    (directory / EMBEDDER_CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))


# --- training: peft LoRA on one or two copies of the base ------------------------------


class TrainableEmbedder(torch.nn.Module):
    """What an embedding run trains: the base under peft's LoRA, frozen but for the adapter;
    with ``separate`` a second adapted copy for documents. ``forward`` returns the
    normalised mean-pooled vectors of a collated batch for ``role``."""

    def __init__(
        self,
        *,
        base_model: str,
        lora: dict[str, Any],
        max_length: int,
        separate: bool,
        document_fields: str = DEFAULT_DOCUMENT_FIELDS,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        document_text("", "", document_fields)
        self.base_model = base_model
        self.lora = dict(lora)
        self.max_length = max_length
        self.separate = separate
        self.document_fields = document_fields

        def adapted() -> Any:
            config = LoraConfig(
                r=int(lora["lora_r"]),
                lora_alpha=float(lora["lora_alpha"]),  # type: ignore[arg-type]
                lora_dropout=float(lora["lora_dropout"]),
                target_modules=list(lora["lora_target_modules"]),
                bias="none",
            )
            return get_peft_model(adapters.load_base_encoder(base_model), config)

        self.query_encoder = adapted()
        self.document_encoder = adapted() if separate else None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, role: str = "query"
    ) -> torch.Tensor:
        encoder = self.query_encoder
        if role == "document" and self.document_encoder is not None:
            encoder = self.document_encoder
        states = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        pooled = mean_pool(states.float(), attention_mask)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def encoder_tensors(self, role: str) -> dict[str, torch.Tensor]:
        """One role's LoRA tensors by their stored names (live: copy before keeping)."""
        from peft.tuners.lora import Linear as LoraLinear

        encoder = self.query_encoder
        if role == "document":
            if self.document_encoder is None:
                raise ValueError("one encoder for both roles: ask for the query's")
            encoder = self.document_encoder
        inner: Any = encoder.base_model.model
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, Any] = {
            name: module for name, module in inner.named_modules() if isinstance(module, LoraLinear)
        }
        for name, layer in layers.items():
            tensors[f"{name}.lora_A"] = layer.lora_A["default"].weight
            tensors[f"{name}.lora_B"] = layer.lora_B["default"].weight
        return tensors

    def roles(self) -> tuple[str, ...]:
        return ROLES if self.separate else ("query",)

    def load_encoder_tensors(self, role: str, tensors: Mapping[str, torch.Tensor]) -> None:
        own = self.encoder_tensors(role)
        if set(own) != set(tensors):
            missing = sorted(set(own) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(own))[:3]
            raise AdapterError(f"{role} tensors do not match (missing {missing}, extra {extra})")
        with torch.no_grad():
            for name, target in own.items():
                if tuple(tensors[name].shape) != tuple(target.shape):
                    raise AdapterError(f"{name} has shape {tuple(tensors[name].shape)}")
                target.copy_(tensors[name])

    def meta(self) -> dict[str, Any]:
        entry = base_models.get(self.base_model)
        encoder: Any = self.query_encoder
        return {
            "kind": KIND,
            "format": base_models.FORMAT_ADAPTER,
            "base_model": self.base_model,
            "base": entry.base,
            "base_sha256": base_models.base_sha256(self.base_model),
            "lora": {
                "r": int(self.lora["lora_r"]),
                "alpha": float(self.lora["lora_alpha"]),
                "dropout": float(self.lora["lora_dropout"]),
                "target_modules": list(self.lora["lora_target_modules"]),
            },
            "max_length": self.max_length,
            "pooling": "mean",
            "separate": self.separate,
            "dim": int(encoder.base_model.model.config.hidden_size),
            "document_fields": self.document_fields,
        }

    def snapshot(
        self,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(meta, query tensors, document tensors or None), copied to the CPU now."""

        def copied(role: str) -> dict[str, torch.Tensor]:
            return {
                n: t.detach().to("cpu", copy=True) for n, t in self.encoder_tensors(role).items()
            }

        return self.meta(), copied("query"), copied("document") if self.separate else None

    def save(self, directory: Path) -> None:
        """Write the model directory :func:`load_embedder` reads."""
        meta, query, document = self.snapshot()
        write_embedder_dir(directory, meta=meta, query=query, document=document)

    @classmethod
    def from_dir(cls, directory: Path) -> TrainableEmbedder:
        """The trainable model of a saved directory (a resume)."""
        meta = read_meta(directory)
        adapters._check_base(meta)
        lora = meta["lora"]
        model = cls(
            base_model=str(meta["base_model"]),
            lora={
                "lora_r": lora["r"],
                "lora_alpha": lora["alpha"],
                "lora_dropout": lora["dropout"],
                "lora_target_modules": lora["target_modules"],
            },
            max_length=int(meta["max_length"]),
            separate=bool(meta["separate"]),
            document_fields=str(meta.get("document_fields", "text")),
        )
        for role, name in (("query", QUERY_WEIGHTS), ("document", DOCUMENT_WEIGHTS)):
            if role in model.roles():
                model.load_encoder_tensors(role, load_safetensors((directory / name).read_bytes()))
        return model
