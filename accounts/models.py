"""Users, organizations, memberships and API tokens.

The system user ``prebuilds`` owns prebuilt workspaces while they wait to be claimed. It is
hidden from every query through ``User.objects`` unless the caller passes ``include_system=True``;
Django's base manager (used to follow foreign keys) still sees it, so ``workspace.owner`` works.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib.auth.models import AbstractUser
from django.contrib.auth.models import UserManager as DjangoUserManager
from django.db import models
from django.utils import timezone

SYSTEM_USER_ID = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")
SYSTEM_USERNAME = "prebuilds"
DEFAULT_ORGANIZATION_SLUG = "default"


class UserManager(DjangoUserManager):
    """Hides system users unless asked with ``include_system=True``.

    ``all``, ``filter``, ``exclude`` and ``get`` take the keyword; every other queryset method
    (``count``, ``order_by``, …) works on the hidden-by-default queryset.
    """

    def get_queryset(self, include_system: bool = False) -> models.QuerySet:
        queryset = super().get_queryset()
        return queryset if include_system else queryset.filter(is_system=False)

    def all(self, include_system: bool = False) -> models.QuerySet:
        return self.get_queryset(include_system)

    def filter(self, *args: Any, include_system: bool = False, **kwargs: Any) -> models.QuerySet:
        return self.get_queryset(include_system).filter(*args, **kwargs)

    def exclude(self, *args: Any, include_system: bool = False, **kwargs: Any) -> models.QuerySet:
        return self.get_queryset(include_system).exclude(*args, **kwargs)

    def get(self, *args: Any, include_system: bool = False, **kwargs: Any) -> User:
        return self.get_queryset(include_system).get(*args, **kwargs)


class User(AbstractUser):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    is_system = models.BooleanField(
        default=False,
        help_text="System users own prebuilt workspaces and can never log in.",
    )

    # Django follows foreign keys (``workspace.owner``) with ``_base_manager``, a plain
    # unfiltered Manager, so prebuilds still resolve their system owner.
    objects = UserManager()

    class Meta:
        ordering = ["username"]

    def __str__(self) -> str:
        return self.username


class Organization(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    members = models.ManyToManyField(User, through="Membership", related_name="organizations")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    TEMPLATE_ADMIN = "template_admin", "Template admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="membership_unique"),
            models.CheckConstraint(
                condition=models.Q(role__in=Role.values), name="membership_role_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only a hash of the secret is stored."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    key_id = models.CharField(max_length=32, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} token {self.key_id}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
