from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    name = "apps.deployments"
    label = "deployments"
    verbose_name = "Deployments"

    def ready(self) -> None:
        from apps.core.metrics import SCRAPE_TIME_COLLECTORS
        from apps.deployments.alerts import OpenAlertsCollector

        SCRAPE_TIME_COLLECTORS.append(OpenAlertsCollector())
