from django.apps import AppConfig


class RefappConfig(AppConfig):
    name = "tests.refapp"
    label = "refapp"
