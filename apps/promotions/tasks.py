from __future__ import annotations

from celery import shared_task

from apps.promotions import services
from apps.promotions.models import PromotionRequest, PromotionStatus


@shared_task(name="promotions.check", soft_time_limit=60, time_limit=90)
def check_promotion(promotion_id: str) -> str | None:
    promotion = services.promotion_check(promotion_id=promotion_id)
    return promotion.status if promotion else None


@shared_task(name="promotions.check_waiting", soft_time_limit=60, time_limit=90)
def check_waiting_promotions() -> int:
    """Beat's safety net: move on every request whose evaluations finished."""
    waiting = PromotionRequest.objects.filter(status=PromotionStatus.CHECKING)
    for promotion_id in waiting.values_list("pk", flat=True):
        services.promotion_check(promotion_id=promotion_id)
    return waiting.count()
