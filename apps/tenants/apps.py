from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "apps.tenants"
    label = "tenants"
    verbose_name = "Tenants and access"

    def ready(self) -> None:
        from apps.tenants import schema  # noqa: F401  (registers the OpenAPI auth scheme)
