"""Admin for accounts. System users appear only through the explicit "System users" filter."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.http import HttpRequest

from accounts import services
from accounts.models import ApiToken, Membership, Organization, User

SYSTEM_FILTER_PARAMETER = "system"


class SystemUserFilter(admin.SimpleListFilter):
    title = "system users"
    parameter_name = SYSTEM_FILTER_PARAMETER

    def lookups(self, request, model_admin):
        return [("include", "Include system users"), ("only", "Only system users")]

    def queryset(self, request, queryset):
        if self.value() == "only":
            return queryset.filter(is_system=True)
        return queryset


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    list_display = ("username", "email", "is_staff", "is_active", "is_system", "date_joined")
    list_filter = (SystemUserFilter, "is_staff", "is_superuser", "is_active")
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest):
        include = request.GET.get(SYSTEM_FILTER_PARAMETER) in ("include", "only")
        return User.objects.get_queryset(include_system=include)

    def has_change_permission(self, request, obj=None) -> bool:
        # The database refuses changes to system users; say so up front instead of a 500.
        if obj is not None and obj.is_system:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and obj.is_system:
            return False
        return super().has_delete_permission(request, obj)


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "created_at")
    search_fields = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role", "organization")
    search_fields = ("user__username", "organization__name")
    autocomplete_fields = ("user", "organization")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("key_id", "user", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("key_id", "user__username", "name")
    readonly_fields = ("key_id", "user", "created_at", "last_used_at", "revoked_at")
    fields = ("name", *readonly_fields)
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        # Tokens are shown once at creation: `python manage.py create_api_token USERNAME`.
        return False

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            services.api_token_revoke(token=token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).", messages.SUCCESS)
