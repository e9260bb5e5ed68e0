"""Per-tenant LoRA adapters on a shared encoder: training, storing, serving, exporting.

A tenant's adapter model is a low-rank update of some linear layers of a shared base
encoder (all-MiniLM-L6-v2) plus a classification head on the mean of its token states. Its
directory (and the artifact tar made of it) holds only what the tenant adds:

- ``adapter.json``: the base it adapts (catalogue id, name, the sha256 of the base's
  weights file), the LoRA shape (``r``, ``alpha``, ``dropout``, ``target_modules``),
  ``max_length``, ``pooling`` ("mean") and ``num_labels``;
- ``adapter.safetensors``: per adapted linear layer ``<module path>.lora_A`` (r x in) and
  ``<module path>.lora_B`` (out x r), module paths as in ``BertModel`` (for example
  ``encoder.layer.0.attention.self.query``), and ``head.weight`` / ``head.bias``;
- ``labels.json``, as every model directory.

Training (:class:`AdapterClassifier`) wraps the base with ``peft``'s LoRA: only the adapter
and the head take gradients. Serving and evaluation (:class:`SharedBase`) hold the base once
per process and device and run any number of adapters through it: a batch that mixes
tenants runs the encoder once, each adapted layer adding every row's own low-rank update
(``x @ A_row^T @ B_row^T``, gathered per row as Punica's BGMV kernel does, here with two
batched matmuls), and each tenant's head on its own rows. An adapter whose base sha256 is
not the base this host holds is refused.

:func:`export_merged` writes a standalone model (the LoRA update folded into the encoder's
weights, ``W + (alpha / r) B A``) that plain ``transformers`` loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from tokenizers import Tokenizer

from worker import base_models
from worker.serving.specs import Output  # a label and its score, as every classifier answers

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
LABELS_FILE = "labels.json"
ADAPTER_MEMBERS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_FILE)
EXPORT_CONFIG = "workbench_export.json"
HEAD_WEIGHTS = "head.safetensors"
# Texts per forward pass of the shared base (rows of every tenant in the batch together).
FORWARD_ROWS = 64
# The base tokenizer's files an export carries.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


class AdapterError(ValueError):
    """An adapter that cannot be used here: unreadable, malformed, or for another base."""


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


# --- the shared base, on this host -----------------------------------------------------


def base_dir(base_model: str) -> Path:
    """Where the weights an adapter entry adapts are installed."""
    if base_models.get(base_model).format != base_models.FORMAT_ADAPTER:
        raise AdapterError(f"{base_model!r} is not an adapter base model")
    return base_models.minilm_path()


def base_memory_bytes(base_model: str) -> int:
    """Bytes the shared base takes on a replica: its weights (float32), held once."""
    return (base_dir(base_model) / "model.safetensors").stat().st_size


def load_base_encoder(base_model: str, *, pooler: bool = False) -> Any:
    """The base ``BertModel``, eval mode; without its pooler unless asked (the head pools
    the token states; an export keeps it so that ``AutoModel`` finds every weight)."""
    from transformers import BertModel

    import worker.modeling  # noqa: F401 - turns transformers' progress bars off

    # Without the pooler its weights are "unexpected", and a single process is "not
    # sharded": both expected here, so no load report.
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        encoder = BertModel.from_pretrained(
            base_dir(base_model),
            local_files_only=True,
            use_safetensors=True,
            add_pooling_layer=pooler,
        )
    finally:
        quiet.setLevel(level)
    encoder.train(False)
    return encoder


def base_tokenizer(base_model: str, *, max_length: int) -> Any:
    """The base's transformers tokenizer, truncating at ``max_length`` (training)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir(base_model), local_files_only=True)
    tokenizer.model_max_length = max_length
    return tokenizer


# --- training: peft LoRA plus a head ---------------------------------------------------


@dataclass
class _Logits:
    logits: torch.Tensor


def mean_pool(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's token states over its real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class AdapterClassifier(torch.nn.Module):
    """What an adapter run trains: the base under peft's LoRA (frozen but for the adapter),
    dropout and a linear head on the mean-pooled token states. ``forward`` returns an object
    with ``logits``, as a transformers classifier does, so the training loop runs it as is."""

    def __init__(
        self, *, base_model: str, lora: dict[str, Any], num_labels: int, max_length: int
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.base_model = base_model
        self.lora = dict(lora)
        self.max_length = max_length
        encoder = load_base_encoder(base_model)
        config = LoraConfig(
            r=int(lora["lora_r"]),
            # peft annotates int, computes alpha / r in floats: a float alpha is fine.
            lora_alpha=float(lora["lora_alpha"]),  # type: ignore[arg-type]
            lora_dropout=float(lora["lora_dropout"]),
            target_modules=list(lora["lora_target_modules"]),
            bias="none",
        )
        self.encoder = get_peft_model(encoder, config)
        hidden = int(encoder.config.hidden_size)
        self.dropout = torch.nn.Dropout(float(encoder.config.hidden_dropout_prob))
        self.head = torch.nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Logits:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        pooled = mean_pool(states, attention_mask)
        return _Logits(logits=self.head(self.dropout(pooled)))

    def lora_layers(self) -> dict[str, Any]:
        """Module path inside ``BertModel`` -> peft's LoRA linear layer."""
        from peft.tuners.lora import Linear as LoraLinear

        inner: Any = self.encoder.base_model.model
        return {
            name: module for name, module in inner.named_modules() if isinstance(module, LoraLinear)
        }

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What the tenant adds, by its stored names (live tensors: copy before keeping)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.lora_layers().items():
            tensors[f"{name}.lora_A"] = layer.lora_A["default"].weight
            tensors[f"{name}.lora_B"] = layer.lora_B["default"].weight
        tensors["head.weight"] = self.head.weight
        tensors["head.bias"] = self.head.bias
        return tensors

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.adapter_tensors()
        if set(own) != set(tensors):
            missing = sorted(set(own) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(own))[:3]
            raise AdapterError(f"adapter tensors do not match (missing {missing}, extra {extra})")
        with torch.no_grad():
            for name, target in own.items():
                if tuple(tensors[name].shape) != tuple(target.shape):
                    raise AdapterError(f"{name} has shape {tuple(tensors[name].shape)}")
                target.copy_(tensors[name])

    def meta(self, labels: list[str]) -> dict[str, Any]:
        entry = base_models.get(self.base_model)
        return {
            "format": base_models.FORMAT_ADAPTER,
            "base_model": self.base_model,
            "base": entry.base,
            "base_sha256": base_models.base_sha256(self.base_model),
            "r": int(self.lora["lora_r"]),
            "alpha": float(self.lora["lora_alpha"]),
            "dropout": float(self.lora["lora_dropout"]),
            "target_modules": list(self.lora["lora_target_modules"]),
            "max_length": self.max_length,
            "pooling": "mean",
            "num_labels": len(labels),
        }


def build_adapter_classifier(
    base_model: str, *, lora: dict[str, Any], labels: list[str], max_length: int
) -> tuple[AdapterClassifier, Any]:
    """A new adapter classifier and the base's tokenizer; the adapter and head are
    initialised from the global torch RNG (seed it first)."""
    model = AdapterClassifier(
        base_model=base_model, lora=lora, num_labels=len(labels), max_length=max_length
    )
    return model, base_tokenizer(base_model, max_length=max_length)


def write_adapter_dir(
    directory: Path, *, meta: dict[str, Any], tensors: dict[str, torch.Tensor], labels: list[str]
) -> None:
    """Write an adapter model directory (created): config, safetensors, labels."""
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(contiguous, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))
    mapping = {str(index): label for index, label in enumerate(labels)}
    (directory / LABELS_FILE).write_text(json.dumps(mapping, indent=1, ensure_ascii=False))


def save_adapter_dir(directory: Path, model: AdapterClassifier, labels: list[str]) -> None:
    write_adapter_dir(
        directory, meta=model.meta(labels), tensors=model.adapter_tensors(), labels=labels
    )


def read_meta(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    if not isinstance(meta, dict):
        raise AdapterError(f"{ADAPTER_CONFIG} is not an object")
    return meta


def _read_labels(raw: bytes) -> list[str]:
    mapping = json.loads(raw)
    return [str(mapping[str(index)]) for index in range(len(mapping))]


def load_adapter_classifier(directory: Path) -> tuple[AdapterClassifier, Any, list[str]]:
    """The trainable model of an adapter directory (a resume), its tokenizer and labels."""
    meta = read_meta(directory)
    labels = _read_labels((directory / LABELS_FILE).read_bytes())
    base_model = str(meta["base_model"])
    _check_base(meta)
    lora = {
        "lora_r": meta["r"],
        "lora_alpha": meta["alpha"],
        "lora_dropout": meta["dropout"],
        "lora_target_modules": meta["target_modules"],
    }
    model, tokenizer = build_adapter_classifier(
        base_model, lora=lora, labels=labels, max_length=int(meta["max_length"])
    )
    model.load_adapter_tensors(load_safetensors((directory / ADAPTER_WEIGHTS).read_bytes()))
    return model, tokenizer, labels


def _check_base(meta: dict[str, Any]) -> None:
    base_model = str(meta.get("base_model", ""))
    try:
        entry = base_models.get(base_model)
    except base_models.UnknownBaseModel as error:
        raise AdapterError(f"adapter for an unknown base model {base_model!r}") from error
    if entry.format != base_models.FORMAT_ADAPTER:
        raise AdapterError(f"{base_model!r} is not an adapter base model")
    held = base_models.base_sha256(base_model)
    if meta.get("base_sha256") != held:
        raise AdapterError(
            f"adapter is for base weights sha256 {meta.get('base_sha256')}; "
            f"this host holds {base_model} with sha256 {held}"
        )


def adapter_bytes(directory: Path) -> int:
    """Bytes of what the tenant adds (adapter and head tensors), as a replica holds them."""
    tensors = load_safetensors((directory / ADAPTER_WEIGHTS).read_bytes())
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- serving and evaluation: one base, many adapters -----------------------------------


def lora_factors(
    tensors: Mapping[str, torch.Tensor], *, r: int, alpha: float, device: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B scaled by alpha / r) for every ``<module>.lora_A`` in
    ``tensors``, on ``device``, in the shape :class:`SharedBase` runs them; AdapterError
    when a pair does not match or its rank is not ``r``."""
    scale = alpha / r
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            b = tensors.get(f"{module}.lora_B")
            if b is None or tensor.dim() != 2 or b.dim() != 2 or b.shape[1] != tensor.shape[0]:
                raise AdapterError(f"{module}: lora_A and lora_B do not match")
            if tensor.shape[0] != r:
                raise AdapterError(f"{module}: rank {tensor.shape[0]}, config says {r}")
            factors[module] = (
                tensor.float().to(device).contiguous(),
                (b.float() * scale).to(device).contiguous(),
            )
    return factors


class Adapter:
    """One tenant's adapter, ready for :class:`SharedBase`: per adapted module the low-rank
    factors on the device (``B`` pre-scaled by alpha / r), the head, the labels."""

    def __init__(
        self,
        *,
        meta: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        labels: list[str],
        device: str,
    ) -> None:
        _check_base(meta)
        self.meta = meta
        self.base_model = str(meta["base_model"])
        self.base_sha256 = str(meta["base_sha256"])
        self.labels = labels
        self.max_length = int(meta["max_length"])
        if not labels or int(meta.get("num_labels", len(labels))) != len(labels):
            raise AdapterError("labels.json does not match the adapter's num_labels")
        r, alpha = int(meta["r"]), float(meta["alpha"])
        if r < 1:
            raise AdapterError("adapter rank must be >= 1")
        self.rank = r
        self.factors = lora_factors(tensors, r=r, alpha=alpha, device=device)
        try:
            self.head_weight = tensors["head.weight"].float().to(device)
            self.head_bias = tensors["head.bias"].float().to(device)
        except KeyError as error:
            raise AdapterError(f"adapter lacks {error.args[0]}") from error
        if self.head_weight.shape[0] != len(labels):
            raise AdapterError("the head's outputs do not match the labels")
        expected = {f"{m}.lora_{x}" for m in self.factors for x in "AB"} | {
            "head.weight",
            "head.bias",
        }
        if unexpected := sorted(set(tensors) - expected):
            raise AdapterError(f"adapter has unexpected tensors: {', '.join(unexpected[:5])}")
        self.weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    @classmethod
    def from_files(cls, files: dict[str, bytes], *, device: str) -> Adapter:
        """From the raw bytes of ``adapter.json``, ``adapter.safetensors``, ``labels.json``."""
        try:
            meta = json.loads(files[ADAPTER_CONFIG])
            tensors = load_safetensors(files[ADAPTER_WEIGHTS])
            labels = _read_labels(files[LABELS_FILE])
        except KeyError as error:
            raise AdapterError(f"adapter lacks {error.args[0]}") from error
        except Exception as error:  # bad JSON, bad safetensors header, missing label index
            raise AdapterError(f"unreadable adapter files: {error}") from error
        if not isinstance(meta, dict):
            raise AdapterError(f"{ADAPTER_CONFIG} is not an object")
        try:
            return cls(meta=meta, tensors=tensors, labels=labels, device=device)
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, AdapterError):
                raise
            raise AdapterError(f"malformed adapter: {error}") from error

    @classmethod
    def from_dir(cls, directory: Path, *, device: str) -> Adapter:
        names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABELS_FILE)
        return cls.from_files({n: (directory / n).read_bytes() for n in names}, device=device)


class _MultiLoraLinear(torch.nn.Module):
    """A base linear layer plus, while a batch runs, each row's own low-rank update."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        # Set by SharedBase for one forward pass: (A rows: n x r x in, B rows: n x out x r),
        # or one (A, B) pair for a batch of one adapter; None: no adapter adapts this layer.
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shared = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.rows is None:
            return out
        a, b = self.rows
        if self.shared:
            return out + (x @ a.t()) @ b.t()
        return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class SharedBase:
    """The base encoder, once per process and device, and the forward pass for batches of
    rows of any number of adapters on it (see the module docstring)."""

    def __init__(self, base_model: str, *, device: str) -> None:
        self.base_model = base_model
        self.sha256 = base_models.base_sha256(base_model) or ""
        self.device = device
        path = base_dir(base_model)
        encoder = load_base_encoder(base_model)
        encoder.requires_grad_(False)
        self.layers: dict[str, _MultiLoraLinear] = {}
        for name, module in list(encoder.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, torch.nn.Linear) and _targetable(full):
                    wrapped = _MultiLoraLinear(child)
                    setattr(module, child_name, wrapped)
                    self.layers[full] = wrapped
        self.encoder = encoder.to(device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = int(pad) if pad is not None else 0
        self.lock = threading.Lock()

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids as the transformers tokenizer truncating at ``max_length`` gives them:
        the first tokens of the text, then the closing [SEP]."""
        rows = []
        for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=True):
            ids = list(encoding.ids)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + ids[-1:]
            rows.append(ids)
        return rows

    @torch.inference_mode()
    def predict(self, groups: Sequence[tuple[Adapter, Sequence[str]]]) -> list[list[Output]]:
        """Each group's texts through its adapter; the rows of every group share each
        forward pass of the base (``FORWARD_ROWS`` rows at a time)."""
        rows: list[tuple[int, list[int]]] = []  # (group index, token ids)
        for index, (adapter, texts) in enumerate(groups):
            self._check_holds(adapter)
            rows += [(index, ids) for ids in self.encode(texts, adapter.max_length)]
        results: list[list[Output]] = [[] for _ in groups]
        with self.lock:
            for start in range(0, len(rows), FORWARD_ROWS):
                chunk = rows[start : start + FORWARD_ROWS]
                for index, prediction in zip(
                    (g for g, _ in chunk), self._forward(groups, chunk), strict=True
                ):
                    results[index].append(prediction)
        return results

    def _forward(
        self,
        groups: Sequence[tuple[Adapter, Sequence[str]]],
        chunk: list[tuple[int, list[int]]],
    ) -> list[Output]:
        from worker.modeling import collate

        batch = {
            k: v.to(self.device) for k, v in collate([ids for _, ids in chunk], self.pad_id).items()
        }
        # One slot per distinct adapter: several requests of one tenant share theirs.
        adapters: list[Adapter] = []
        slots: dict[int, int] = {}  # id(adapter) -> its slot
        row_slots = []
        for g, _ in chunk:
            adapter = groups[g][0]
            slot = slots.setdefault(id(adapter), len(adapters))
            if slot == len(adapters):
                adapters.append(adapter)
            row_slots.append(slot)
        row_adapter = torch.tensor(row_slots, device=self.device)
        pooled = self._pooled(adapters, row_adapter, batch)
        out: list[Output | None] = [None] * len(chunk)
        for i, adapter in enumerate(adapters):
            picked = (row_adapter == i).nonzero(as_tuple=True)[0]
            logits = pooled[picked] @ adapter.head_weight.t() + adapter.head_bias
            scores, indices = torch.softmax(logits, dim=-1).max(dim=-1)
            for row, label, score in zip(
                picked.tolist(), indices.tolist(), scores.tolist(), strict=True
            ):
                out[row] = Output(label=adapter.labels[label], score=score)
        return [p for p in out if p is not None]

    def probabilities(self, adapter: Adapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One adapter's class probabilities for a collated batch (evaluation's timed pass)."""
        self._check_holds(adapter)
        rows = batch["input_ids"].shape[0]
        with self.lock:
            pooled = self._pooled(
                [adapter], torch.zeros(rows, dtype=torch.long, device=self.device), batch
            )
        logits = pooled @ adapter.head_weight.t() + adapter.head_bias
        return torch.softmax(logits, dim=-1)

    def _check_holds(self, adapter: Adapter) -> None:
        if adapter.base_sha256 != self.sha256:
            raise AdapterError(
                f"adapter for base sha256 {adapter.base_sha256}; this base is {self.sha256}"
            )

    def _pooled(
        self, adapters: list[Adapter], row_adapter: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The mean-pooled token states of a batch, each row through its adapter."""
        try:
            self._select(adapters, row_adapter)
            states = self.encoder(**batch)[0]
        finally:
            for layer in self.layers.values():
                layer.rows, layer.shared = None, False
        return mean_pool(states, batch["attention_mask"]).float()

    def _select(self, adapters: list[Adapter], row_adapter: torch.Tensor) -> None:
        """Give each adapted layer the rows' factors for this pass: the adapter's own when
        one adapter has every row, else stacked per adapter (zero-padded to the largest
        rank; zeros where an adapter leaves the layer alone) and gathered per row."""
        for name, layer in self.layers.items():
            present = [a.factors.get(name) for a in adapters]
            if all(p is None for p in present):
                continue
            if len(adapters) == 1:
                layer.rows, layer.shared = present[0], True
                continue
            rank = max(a.rank for a, p in zip(adapters, present, strict=True) if p is not None)
            width_in = layer.base.in_features
            width_out = layer.base.out_features
            stacked_a = torch.zeros(len(adapters), rank, width_in, device=self.device)
            stacked_b = torch.zeros(len(adapters), width_out, rank, device=self.device)
            for i, pair in enumerate(present):
                if pair is not None:
                    a, b = pair
                    stacked_a[i, : a.shape[0]] = a
                    stacked_b[i, :, : b.shape[1]] = b
            layer.rows = (stacked_a[row_adapter], stacked_b[row_adapter])
            layer.shared = False


def _targetable(module_path: str) -> bool:
    return any(
        module_path == t or module_path.endswith("." + t) for t in base_models.LORA_TARGET_MODULES
    )


_bases: dict[tuple[str, str], SharedBase] = {}
_bases_lock = threading.Lock()


def shared_base(base_model: str, *, device: str) -> SharedBase:
    """This process's one copy of ``base_model`` on ``device`` (loaded on first use)."""
    key = (base_model, device)
    with _bases_lock:
        held = _bases.get(key)
        if held is None:
            held = SharedBase(base_model, device=device)
            _bases[key] = held
        return held


def held_bases() -> list[SharedBase]:
    """The bases this process holds (for a replica's statistics)."""
    with _bases_lock:
        return list(_bases.values())


class AdapterModel:
    """One adapter on this process's shared base: ``predict`` as a classifier does."""

    def __init__(self, adapter: Adapter, base: SharedBase) -> None:
        self.adapter = adapter
        self.base = base
        self.labels = adapter.labels
        self.weight_bytes = adapter.weight_bytes

    @property
    def device(self) -> str:
        return self.base.device

    def predict(self, texts: list[str], *, batch_size: int = FORWARD_ROWS) -> list[Output]:
        del batch_size  # the shared base batches FORWARD_ROWS rows at a time
        return self.base.predict([(self.adapter, texts)])[0]

    def collate(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``texts`` as one padded batch on the device (what :meth:`probabilities` takes)."""
        from worker.modeling import collate

        ids = self.base.encode(texts, self.adapter.max_length)
        return {k: v.to(self.device) for k, v in collate(ids, self.base.pad_id).items()}

    @torch.inference_mode()
    def probabilities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class probabilities (rows x labels) for a batch from :meth:`collate`."""
        return self.base.probabilities(self.adapter, batch)


def load_adapter_model(directory: Path, *, device: str) -> AdapterModel:
    adapter = Adapter.from_dir(directory, device=device)
    return AdapterModel(adapter, shared_base(adapter.base_model, device=device))


def predict_mixed(
    requests: Sequence[tuple[AdapterModel, Sequence[str]]],
) -> list[list[Output]]:
    """Requests of many adapters: one shared forward pass per base for all their rows."""
    results: list[list[Output]] = [[] for _ in requests]
    by_base: dict[int, list[int]] = {}
    for position, (model, _) in enumerate(requests):
        by_base.setdefault(id(model.base), []).append(position)
    for positions in by_base.values():
        base = requests[positions[0]][0].base
        outputs = base.predict([(requests[p][0].adapter, requests[p][1]) for p in positions])
        for p, output in zip(positions, outputs, strict=True):
            results[p] = output
    return results


# --- export: a standalone merged model -------------------------------------------------


def export_merged(model_dir: Path, target_dir: Path) -> None:
    """A directory that serves without the workbench: for an adapter, the base encoder
    with the LoRA update merged into its weights (``config.json``, ``model.safetensors``,
    tokenizer files), the head (``head.safetensors``), ``labels.json``,
    ``workbench_export.json`` and a README with the recipe; a full model's directory is
    copied as it is (``AutoModelForSequenceClassification`` loads it)."""
    if target_dir.exists():
        raise FileExistsError(target_dir)
    if not is_adapter_dir(model_dir):
        shutil.copytree(model_dir, target_dir)
        return
    meta = read_meta(model_dir)
    _check_base(meta)
    tensors = load_safetensors((model_dir / ADAPTER_WEIGHTS).read_bytes())
    base_model = str(meta["base_model"])
    encoder = load_base_encoder(base_model, pooler=True)
    scale = float(meta["alpha"]) / int(meta["r"])
    modules = dict(encoder.named_modules())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.endswith(".lora_A"):
                module = modules[name[: -len(".lora_A")]]
                update = (tensors[name[: -len("A")] + "B"].float() * scale) @ tensor.float()
                module.weight += update
    target_dir.mkdir(parents=True)
    encoder.save_pretrained(target_dir, safe_serialization=True)
    source = base_dir(base_model)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target_dir / name)
    save_file(
        {"weight": tensors["head.weight"].contiguous(), "bias": tensors["head.bias"].contiguous()},
        str(target_dir / HEAD_WEIGHTS),
    )
    shutil.copyfile(model_dir / LABELS_FILE, target_dir / LABELS_FILE)
    (target_dir / EXPORT_CONFIG).write_text(
        json.dumps(
            {
                "format": "merged",
                "merged_from": meta,
                "pooling": "mean",
                "max_length": int(meta["max_length"]),
            },
            indent=1,
            sort_keys=True,
        )
    )
    (target_dir / "README.md").write_text(_EXPORT_README.format(max_length=meta["max_length"]))


_EXPORT_README = """# A Workbench classifier, exported

The tenant's LoRA adapter is merged into the all-MiniLM-L6-v2 encoder's weights: this folder
needs only `torch` and `transformers`.

```python
import json, torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = "."  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder)
encoder = AutoModel.from_pretrained(folder).eval()
head = load_file(f"{{folder}}/head.safetensors")
labels = json.load(open(f"{{folder}}/labels.json"))

def predict(texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length},
                      return_tensors="pt")
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (states * mask).sum(1) / mask.sum(1)
    probs = torch.softmax(pooled @ head["weight"].T + head["bias"], dim=-1)
    scores, ids = probs.max(dim=-1)
    return [(labels[str(i)], s) for i, s in zip(ids.tolist(), scores.tolist())]
```
"""


def load_export(directory: Path) -> Callable[[list[str]], list[Output]]:
    """The README's recipe, as a function (what the export's round-trip test runs)."""
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((directory / EXPORT_CONFIG).read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    encoder = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    head = load_safetensors((directory / HEAD_WEIGHTS).read_bytes())
    labels = _read_labels((directory / LABELS_FILE).read_bytes())
    max_length = int(config["max_length"])

    @torch.no_grad()
    def predict(texts: list[str]) -> list[Output]:
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        states = encoder(**batch).last_hidden_state
        pooled = mean_pool(states, batch["attention_mask"])
        probs = F.softmax(pooled @ head["weight"].t() + head["bias"], dim=-1)
        scores, ids = probs.max(dim=-1)
        return [
            Output(label=labels[i], score=s)
            for i, s in zip(ids.tolist(), scores.tolist(), strict=True)
        ]

    return predict
