from django.db import models


class VersionUser(models.Model):
    """Test-only: something that uses a dataset version, as a training run will (PROTECT)."""

    version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.PROTECT, related_name="+"
    )

    def __str__(self) -> str:
        return f"uses {self.version_id}"
