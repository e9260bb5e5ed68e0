from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "apps.core"
    label = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        # Every process that loads Django (web, tests, management commands) gets the
        # configured Celery app, so tasks sent from it go to the configured broker.
        import workbench.celery  # noqa: F401
        from apps.core import tasking

        tasking.connect_signals()
