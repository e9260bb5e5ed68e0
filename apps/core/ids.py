"""Opaque, prefixed ids (``ds_7f3a...``): readable in logs, unguessable, never sequential.

Each kind has a named function so migrations can reference it as a column default.
"""

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def new_tenant_id() -> str:
    return new_id("tn")


def new_membership_id() -> str:
    return new_id("mb")


def new_token_id() -> str:
    return new_id("tok")


def new_event_id() -> str:
    return new_id("ev")


def new_dataset_id() -> str:
    return new_id("ds")


def new_dataset_version_id() -> str:
    return new_id("dv")


def new_run_id() -> str:
    return new_id("run")


def new_sweep_id() -> str:
    return new_id("sw")


def new_registered_model_id() -> str:
    return new_id("rm")


def new_model_version_id() -> str:
    return new_id("mv")


def new_evaluation_id() -> str:
    return new_id("eval")


def new_promotion_id() -> str:
    return new_id("pr")


def new_deployment_id() -> str:
    return new_id("dep")


def new_warmup_id() -> str:
    return new_id("wu")


def new_alert_id() -> str:
    return new_id("al")


def new_notebook_id() -> str:
    return new_id("nb")


def new_access_request_id() -> str:
    return new_id("dar")


def new_campaign_id() -> str:
    return new_id("cmp")


def new_campaign_item_id() -> str:
    return new_id("ci")


def new_batch_prediction_id() -> str:
    return new_id("bp")
