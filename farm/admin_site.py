"""The farm's admin site: Django's, plus the cluster overview and usage pages and a link to Flower.

Installed through `farm.admin_apps.FarmAdminConfig`, so `admin.site` (and every `@admin.register`) is this site.
Every page is staff-only and its forms CSRF-protected (`AdminSite.admin_view`)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import path


class FarmAdminSite(admin.AdminSite):
    site_header = "farm"
    site_title = "farm admin"
    index_title = "Operations"
    index_template = "admin/farm/index.html"

    def get_urls(self) -> list:
        from farm import admin_dashboard

        return [
            path("cluster/", self.admin_view(admin_dashboard.cluster_view), name="farm_cluster"),
            path(
                "cluster/workers/<str:worker_id>/<str:action>/",
                self.admin_view(admin_dashboard.worker_action_view),
                name="farm_worker_action",
            ),
            path("usage/", self.admin_view(admin_dashboard.usage_view), name="farm_usage"),
            *super().get_urls(),
        ]

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        from settings import env

        return {**super().each_context(request), "flower_url": env.FLOWER_URL}
