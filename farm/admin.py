"""The operator's dashboard: every farm table in the Django admin."""

from __future__ import annotations

from django.contrib import admin

from farm.models import ApiKey, Job, JobEvent, Model, ModelSpec, Worker


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "name", "owner", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("prefix", "name", "owner__username")
    readonly_fields = ("lookup_id", "prefix", "secret_hash", "created_at", "last_used_at")


class ModelSpecInline(admin.TabularInline):
    model = ModelSpec
    extra = 0


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = ("name", "source", "owned_by", "enabled", "created_at")
    inlines = [ModelSpecInline]


@admin.register(ModelSpec)
class ModelSpecAdmin(admin.ModelAdmin):
    list_display = ("name", "model", "engine", "resource_profile", "min_replicas", "weight", "enabled")
    list_filter = ("engine", "enabled")


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ("worker_id", "hostname", "status", "specs", "last_seen_at")
    list_filter = ("status",)
    readonly_fields = ("worker_id", "hostname", "specs", "hardware", "load", "started_at", "last_seen_at")


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    readonly_fields = ("at", "kind", "attempt", "worker_id", "detail")


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "model", "spec", "status", "attempt", "owner", "created_at", "finished_at")
    list_filter = ("status", "kind", "model")
    search_fields = ("id", "owner__username", "worker_id")
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobEventInline]
    date_hierarchy = "created_at"
