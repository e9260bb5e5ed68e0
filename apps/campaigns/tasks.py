"""Celery tasks for campaigns: thin; every step is idempotent under the item's row lock."""

from __future__ import annotations

from celery import shared_task

from apps.campaigns import services


@shared_task(name="campaigns.advance", soft_time_limit=300, time_limit=360)
def advance_campaign(campaign_id: str) -> int:
    return services.campaign_advance(campaign_id=campaign_id)


@shared_task(name="campaigns.advance_item", soft_time_limit=120, time_limit=180)
def advance_item(item_id: str) -> int:
    """One item moved on after its run or its promotion changed."""
    return services.item_advance_and_finish(item_id=item_id)


@shared_task(name="campaigns.advance_all", soft_time_limit=300, time_limit=360)
def advance_all_campaigns() -> int:
    """Beat's safety net: fire due schedules and new-data triggers, move every item on."""
    return services.campaigns_advance_all()
