import django_filters

from apps.training.models import RunStatus, TrainingRun


class RunFilter(django_filters.FilterSet):
    """Serves both the runs API list and the dashboard's runs page."""

    status = django_filters.ChoiceFilter(choices=RunStatus.choices)
    dataset = django_filters.CharFilter(field_name="dataset_version__dataset_id")
    dataset_version = django_filters.CharFilter(field_name="dataset_version_id")
    base_model = django_filters.CharFilter()
    model = django_filters.CharFilter(field_name="model_name")
    sweep = django_filters.CharFilter(field_name="sweep_id")

    class Meta:
        model = TrainingRun
        fields = ["status", "dataset", "dataset_version", "base_model", "model", "sweep"]
