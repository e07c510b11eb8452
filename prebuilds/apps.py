from django.apps import AppConfig


class PrebuildsConfig(AppConfig):
    name = "prebuilds"
    default_auto_field = "django.db.models.BigAutoField"
