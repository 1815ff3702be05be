from django.apps import AppConfig


class FarmConfig(AppConfig):
    name = "farm"
    verbose_name = "Farm"
    default_auto_field = "django.db.models.BigAutoField"
