"""A run's parameters resolved against its base model: the one rule the runs API, the sweeps
API and the launch form share.

What a run does not name comes from its base model's defaults (``BaseModel.defaults()``: an
adapter run gets 5 epochs and its LoRA shape), then from ``TrainConfig``'s. What is recorded
with the run is the whole resolved config, so a rerun or a reader of the run sees exactly
what trained; a full model's run records no LoRA keys at all, a classifier's run no
embedding keys (``separate_encoders``, ``document_fields``), and only an autocomplete run
records ``init_from``.
"""

from __future__ import annotations

import copy
from typing import Any

from worker import base_models
from worker.training.config import TrainConfig

# Every parameter a run may name (base_model is named beside them, not among them).
KNOWN_PARAMS = frozenset(TrainConfig.__dataclass_fields__) - {"base_model"}


def unknown_params(given: dict[str, Any]) -> str | None:
    """The message for parameters TrainConfig does not have; None when all are known."""
    unknown = sorted(set(given) - KNOWN_PARAMS)
    if not unknown:
        return None
    return f"Unknown parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_PARAMS))}."


def params_resolve(
    *, base_model: str, given: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """(resolved params, field -> message). ``base_model`` must be in the catalogue.

    Errors come from ``TrainConfig.validate()`` (its ranges are not repeated here): a LoRA
    parameter given for a full base is refused there, by name. ``from_dict`` refusing a
    value's type is reported under the empty name.
    """
    entry = base_models.get(base_model)
    try:
        config = TrainConfig.from_dict({**entry.defaults(), **given, "base_model": base_model})
    except (TypeError, ValueError) as exc:
        return {}, {"": str(exc)}
    problems = config.validate()
    if problems:
        return {}, problems
    resolved = config.to_dict()
    resolved.pop("base_model", None)
    if entry.format == base_models.FORMAT_ADAPTER:
        # A copy: the catalogue's default target-module list must not become the run's.
        resolved.update(copy.deepcopy(config.lora()))
    else:
        for name in base_models.LORA_PARAMS:
            resolved.pop(name, None)
    if entry.kind == base_models.KIND_EMBEDDING:
        resolved["document_fields"] = config.resolved_document_fields()
    else:
        for name in base_models.EMBEDDING_PARAMS:
            resolved.pop(name, None)
    if entry.kind == base_models.KIND_AUTOCOMPLETE:
        resolved["init_from"] = config.resolved_init_from()
    else:
        for name in base_models.AUTOCOMPLETE_PARAMS:
            resolved.pop(name, None)
    return resolved, {}
