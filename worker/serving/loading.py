"""Loading a tenant model into a running replica: fetch, verify, unpack in memory, build.

A replica loads many small models, often while serving, so a load must cost little more
than reading the bytes. ``from_pretrained`` spends ~30 ms on a 1 MB model (config
resolution, module construction, weight init, file I/O); this path avoids all of it:

- the artifact (the deterministic tar ``apps.training.packaging.pack_dir`` writes) is read
  into memory (``file://`` or ``s3://``; boto3 honours ``AWS_ENDPOINT_URL``) and its sha256
  checked before anything in it is parsed;
- its members are read from the tar in memory: regular files with plain relative names only;
- the module is built once per architecture (everything in ``config.json`` but the
  vocabulary and label counts) as a *template* whose parameters live on the ``meta``
  device; a load deep-copies the template (sharing its constant buffers) and puts the
  safetensors tensors in place of the meta parameters;
- the tokenizer is ``tokenizers.Tokenizer`` from ``tokenizer.json``, truncating to
  ``model_max_length`` as the transformers wrapper does.

Predictions equal :class:`worker.inference.Classifier`'s for the same model directory (the
tests check it). An adapter artifact (``adapter.json``, see :mod:`worker.adapters`) becomes
an :class:`~worker.adapters.AdapterModel` on the process's one copy of its base: reading
the adapter's few hundred kilobytes is the whole load. An embedding artifact
(``embedder.json``, see :mod:`worker.embeddings`) becomes a
:class:`~worker.serving.embedding.EmbeddingModel` on that same base, and an autocomplete
artifact (``autocomplete.json``, see :mod:`worker.autocomplete`) an
:class:`~worker.serving.autocomplete.AutocompleteModel`. Nothing here imports Django.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer

from worker import adapters, base_models
from worker.modeling import LABELS_FILE, collate
from worker.serving.autocomplete import AutocompleteModel
from worker.serving.embedding import EmbeddingModel
from worker.serving.specs import ModelLoadError, Output

# An artifact bigger than this is refused before it is read whole into memory.
MAX_ARTIFACT_BYTES = 2 * 1024**3
WEIGHTS_FILE = "model.safetensors"
REQUIRED_MEMBERS = ("config.json", WEIGHTS_FILE, "tokenizer.json", LABELS_FILE)
OPTIONAL_MEMBERS = ("tokenizer_config.json",)
# Config keys that vary between models of one architecture without changing its code.
PER_MODEL_CONFIG_KEYS = frozenset(
    {"vocab_size", "id2label", "label2id", "num_labels", "transformers_version", "_name_or_path"}
)
# Texts per forward pass, as worker.inference.Classifier.predict's default.
FORWARD_BATCH = 32


# --- fetching and verifying ------------------------------------------------------------


def fetch_bytes(uri: str) -> bytes:
    """The bytes at ``file:///abs/path`` or ``s3://bucket/key``; ModelLoadError otherwise."""
    parsed = urllib.parse.urlparse(uri)
    try:
        if parsed.scheme == "file":
            path = Path(urllib.parse.unquote(parsed.path))
            if not path.is_absolute():
                raise ModelLoadError(f"artifact path is not absolute: {uri}")
            if path.stat().st_size > MAX_ARTIFACT_BYTES:
                raise ModelLoadError(f"artifact is larger than {MAX_ARTIFACT_BYTES} bytes: {uri}")
            return path.read_bytes()
        if parsed.scheme == "s3":
            key = parsed.path.lstrip("/")
            response = _s3_client().get_object(Bucket=parsed.netloc, Key=key)
            if int(response.get("ContentLength", 0)) > MAX_ARTIFACT_BYTES:
                raise ModelLoadError(f"artifact is larger than {MAX_ARTIFACT_BYTES} bytes: {uri}")
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()
    except ModelLoadError:
        raise
    except Exception as error:  # OSError, botocore's ClientError and friends
        raise ModelLoadError(f"cannot read artifact {uri}: {error}") from error
    raise ModelLoadError(f"unsupported artifact URI (file:// or s3:// only): {uri}")


@functools.cache
def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard"})
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"), config=config)


def verify_sha256(data: bytes, expected: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelLoadError(f"sha256 mismatch: expected {expected}, got {actual}")


def read_members(
    data: bytes, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, bytes]:
    """The named members of the tar in ``data``: regular files with plain relative names
    only (no links, devices, absolute paths or ``..``), every one of ``names`` present."""
    wanted = set(names) | set(optional)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name
                if (
                    name.startswith("/")
                    or ".." in name.split("/")
                    or posixpath.normpath(name) != name
                ):
                    raise ModelLoadError(f"unsafe path in artifact: {name!r}")
                if not (member.isfile() or member.isdir()):
                    raise ModelLoadError(f"artifact member {name!r} is not a regular file")
                if member.isfile() and name in wanted:
                    extracted = tar.extractfile(member)
                    if extracted is None:  # pragma: no cover - isfile() members always have one
                        raise ModelLoadError(f"cannot read {name!r} from the artifact")
                    found[name] = extracted.read()
    except tarfile.TarError as error:
        raise ModelLoadError(f"artifact is not a readable tar: {error}") from error
    missing = [name for name in names if name not in found]
    if missing:
        raise ModelLoadError(f"artifact lacks {', '.join(missing)}")
    return found


# --- building a classifier -------------------------------------------------------------


class FastClassifier:
    """A tenant classifier built by :func:`build_classifier`: ``predict`` as
    :meth:`worker.inference.Classifier.predict` does, on the same device rules."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        labels: list[str],
        pad_token_id: int,
        device: str,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.pad_token_id = pad_token_id
        self.device = device
        # Parameters only: constant buffers are shared with the architecture's template.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """Class probabilities (rows x labels) of one forward batch of ``texts``."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        batch = {k: v.to(self.device) for k, v in collate(ids, self.pad_token_id).items()}
        return torch.softmax(self.model(**batch).logits.float(), dim=-1)

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> list[Output]:
        outputs: list[Output] = []
        for start in range(0, len(texts), FORWARD_BATCH):
            chunk = texts[start : start + FORWARD_BATCH]
            scores, indices = self.probabilities(chunk).max(dim=-1)
            outputs += [
                Output(label=self.labels[index], score=score)
                for index, score in zip(indices.tolist(), scores.tolist(), strict=True)
            ]
        return outputs


# What a replica serves: a whole tenant model, a tenant's adapter on a shared base, a
# tenant's embedding model (encoders on the shared base, and its indexes), or a tenant's
# autocomplete model (a small causal LM, and its sessions' caches).
Served = FastClassifier | adapters.AdapterModel | EmbeddingModel | AutocompleteModel
# An embedding model's artifact (see worker.embeddings): its config and one or two encoders.
EMBEDDER_MEMBERS = ("embedder.json", "query.safetensors", "document.safetensors")
# An autocomplete model's artifact (see worker.autocomplete): its meta (special tokens,
# stop rules) first, then the GPT-2 config, weights and byte-level BPE tokenizer.
AUTOCOMPLETE_MEMBERS = ("autocomplete.json", "config.json", WEIGHTS_FILE, "tokenizer.json")


@dataclass
class LoadedModel:
    classifier: Served
    load_ms: float  # fetch + verify + build, wall clock
    artifact_bytes: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(uri: str, sha256: str, *, device: str | None = None) -> LoadedModel:
    """Fetch, verify and build the classifier at ``uri``; ModelLoadError on any failure."""
    started = time.perf_counter()
    data = fetch_bytes(uri)
    verify_sha256(data, sha256)
    classifier = build_classifier(data, device=device or default_device())
    return LoadedModel(
        classifier=classifier,
        load_ms=(time.perf_counter() - started) * 1000,
        artifact_bytes=len(data),
    )


def build_classifier(data: bytes, *, device: str) -> Served:
    """The classifier in the (already verified) tar ``data``: a full model, or an adapter
    on this process's shared base (refused when this host's base has another sha256)."""
    members = read_members(
        data,
        (),
        (
            *REQUIRED_MEMBERS,
            *OPTIONAL_MEMBERS,
            *adapters.ADAPTER_MEMBERS,
            *EMBEDDER_MEMBERS,
            *AUTOCOMPLETE_MEMBERS,
        ),
    )
    if EMBEDDER_MEMBERS[0] in members:
        return _build_embedder(members, device)
    if AUTOCOMPLETE_MEMBERS[0] in members:
        return _build_completer(members, device)
    if adapters.ADAPTER_CONFIG in members:
        return _build_adapter(members, device)
    missing = [name for name in REQUIRED_MEMBERS if name not in members]
    if missing:
        raise ModelLoadError(f"artifact lacks {', '.join(missing)}")
    try:
        config = json.loads(members["config.json"])
        mapping = json.loads(members[LABELS_FILE])
        labels = [str(mapping[str(index)]) for index in range(len(mapping))]
        tokenizer_config = json.loads(members.get("tokenizer_config.json", b"{}"))
        tokenizer = Tokenizer.from_str(members["tokenizer.json"].decode("utf-8"))
        state = load_safetensors(members[WEIGHTS_FILE])
    except ModelLoadError:
        raise
    except Exception as error:  # bad JSON, bad safetensors header, missing label index...
        raise ModelLoadError(f"unreadable model files: {error}") from error
    if not isinstance(config, dict) or not labels:
        raise ModelLoadError("config.json must be an object and labels.json non-empty")
    max_length = int(tokenizer_config.get("model_max_length", 512))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    pad_token = tokenizer_config.get("pad_token", "[PAD]")
    if isinstance(pad_token, dict):  # an AddedToken serialised in full
        pad_token = pad_token.get("content", "[PAD]")
    pad_id = tokenizer.token_to_id(str(pad_token))
    model = _instantiate(config, state, device)
    return FastClassifier(
        model=model,
        tokenizer=tokenizer,
        labels=labels,
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        device=device,
    )


def _build_adapter(members: dict[str, bytes], device: str) -> adapters.AdapterModel:
    missing = [name for name in adapters.ADAPTER_MEMBERS if name not in members]
    if missing:
        raise ModelLoadError(f"artifact lacks {', '.join(missing)}")
    try:
        adapter = adapters.Adapter.from_files(members, device=device)
        return adapters.AdapterModel(
            adapter, adapters.shared_base(adapter.base_model, device=device)
        )
    except (adapters.AdapterError, base_models.BaseModelUnavailable) as error:
        raise ModelLoadError(str(error)) from error


def _build_embedder(members: dict[str, bytes], device: str) -> EmbeddingModel:
    """An embedding model on this process's shared base (its indexes come separately)."""
    from worker.embeddings import load_embedder_files

    try:
        embedder = load_embedder_files(
            {k: v for k, v in members.items() if k in EMBEDDER_MEMBERS}, device=device
        )
    except (adapters.AdapterError, base_models.BaseModelUnavailable, ValueError) as error:
        raise ModelLoadError(str(error)) from error
    return EmbeddingModel(embedder, weight_bytes=int(embedder.weight_bytes))


def _build_completer(members: dict[str, bytes], device: str) -> AutocompleteModel:
    """An autocomplete model: the completer its artifact holds, with an empty LRU of
    sessions. Its weight bytes are the weights file's (the tensors, stored once: GPT-2's
    output layer is tied to its token embeddings)."""
    from worker.autocomplete import SessionState, load_completer_files

    missing = [name for name in AUTOCOMPLETE_MEMBERS if name not in members]
    if missing:
        raise ModelLoadError(f"artifact lacks {', '.join(missing)}")
    try:
        completer = load_completer_files(
            {k: v for k, v in members.items() if k in AUTOCOMPLETE_MEMBERS}, device=device
        )
    except Exception as error:  # bad meta, config, weights or tokenizer
        raise ModelLoadError(f"unreadable autocomplete model: {error}") from error
    return AutocompleteModel(
        completer, weight_bytes=len(members[WEIGHTS_FILE]), session_factory=SessionState
    )


_templates: dict[tuple[str, str], torch.nn.Module] = {}
_templates_lock = threading.Lock()


def _template_key(config: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in config.items() if k not in PER_MODEL_CONFIG_KEYS}, sort_keys=True
    )


def _template(config: Mapping[str, Any], device: str) -> torch.nn.Module:
    """The architecture's module with meta parameters and real (shared) buffers: built
    once per architecture, device and process, as ``from_pretrained`` would build it."""
    key = (_template_key(config), device)
    with _templates_lock:
        template = _templates.get(key)
        if template is None:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            model_type = config.get("model_type")
            if not isinstance(model_type, str):
                raise ModelLoadError("config.json has no model_type")
            try:
                built_config = AutoConfig.for_model(
                    model_type, **{k: v for k, v in config.items() if k != "model_type"}
                )
                with torch.device("meta"):
                    template = AutoModelForSequenceClassification.from_config(  # type: ignore[no-untyped-call]
                        built_config
                    )
            except Exception as error:
                raise ModelLoadError(
                    f"cannot build a {model_type!r} classifier: {error}"
                ) from error
            template.train(False)  # eval mode: no dropout
            template.requires_grad_(False)
            _materialise_buffers(template, device)
            _templates[key] = template
        return template


def _materialise_buffers(template: torch.nn.Module, device: str) -> None:
    """Give the meta template real buffers. The non-persistent ones (position ids, token
    type ids) are not in the weights file and are the same for every model of the
    architecture, so every model shares the template's."""
    for module in template.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = _real_buffer(module, name, buffer).to(device)


def _real_buffer(module: torch.nn.Module, name: str, meta: torch.Tensor) -> torch.Tensor:
    # BERT-family embeddings register exactly these two constant buffers.
    if name == "position_ids":
        return torch.arange(meta.shape[-1], dtype=meta.dtype).expand(meta.shape).clone()
    if name == "token_type_ids":
        return torch.zeros(meta.shape, dtype=meta.dtype)
    raise ModelLoadError(
        f"{type(module).__name__} has a buffer {name!r} this loader does not know how to build"
    )


def _clone(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree with the same classes and attributes as ``module``: fresh
    containers (parameters, buffers, children, hooks), shared values. ``copy.deepcopy``
    does the same in ~15 ms for a 2-layer BERT (it copies every config and attribute);
    this takes well under a millisecond. The shared values are the template's meta
    parameters (replaced right after), its constant buffers and its config (read only)."""
    clone = object.__new__(type(module))
    state: dict[str, Any] = {
        key: value.copy() if isinstance(value, dict | set | list) else value
        for key, value in module.__dict__.items()
    }
    children: dict[str, torch.nn.Module | None] = state["_modules"]
    for name, child in children.items():
        if child is not None:
            children[name] = _clone(child)
    clone.__dict__.update(state)
    return clone


def _instantiate(
    config: Mapping[str, Any], state: dict[str, torch.Tensor], device: str
) -> torch.nn.Module:
    template = _template(config, device)
    model = _clone(template)
    expected = set()
    for module_name, module in model.named_modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            full = f"{module_name}.{name}" if module_name else name
            expected.add(full)
            tensor = state.get(full)
            if tensor is None:
                raise ModelLoadError(f"weights file lacks {full}")
            if tensor.dim() != parameter.dim():
                raise ModelLoadError(
                    f"{full} has {tensor.dim()} dimensions, expected {parameter.dim()}"
                )
            module._parameters[name] = torch.nn.Parameter(tensor.to(device), requires_grad=False)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ModelLoadError(f"weights file has unexpected tensors: {', '.join(unexpected[:5])}")
    return model
