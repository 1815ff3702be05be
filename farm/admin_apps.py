"""The admin app with the farm's admin site (dashboard, Flower link), installed in place of `django.contrib.admin`.

Its own module: beside `FarmConfig` in `farm/apps.py` it would stop Django from picking `FarmConfig` by default."""

from django.contrib.admin.apps import AdminConfig


class FarmAdminConfig(AdminConfig):
    default_site = "farm.admin_site.FarmAdminSite"
