"""Writes for accounts: memberships, the system rows, API tokens."""

from __future__ import annotations

import functools
from datetime import datetime

from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.utils import timezone

from accounts import tokens
from accounts.models import (
    DEFAULT_ORGANIZATION_SLUG,
    SYSTEM_USER_ID,
    SYSTEM_USERNAME,
    ApiToken,
    Membership,
    Organization,
    Role,
    User,
)
from config.sql import Columns, columns, fetch_one

API_TOKEN_PREFIX = "wst"


def organization_default() -> Organization:
    """The default organization, created if missing (idempotent)."""
    organization, _ = Organization.objects.get_or_create(
        slug=DEFAULT_ORGANIZATION_SLUG, defaults={"name": "Default"}
    )
    return organization


def membership_ensure(*, user: User, organization: Organization, role: str = Role.MEMBER):
    """Make ``user`` a member of ``organization``; an existing membership keeps its role."""
    membership, _ = Membership.objects.get_or_create(
        user=user, organization=organization, defaults={"role": role}
    )
    return membership


def membership_ensure_default(*, user: User) -> Membership:
    return membership_ensure(user=user, organization=organization_default())


def system_rows_ensure() -> User:
    """Create the default organization and the system user if missing (idempotent).

    The system user has an unusable password, no permissions, is inactive for interactive use
    and belongs to the default organization. The database trigger forbids changing it later.
    """
    organization = organization_default()
    system_user = User.objects.filter(id=SYSTEM_USER_ID, include_system=True).first()
    if system_user is None:
        system_user = User.objects.create(
            id=SYSTEM_USER_ID,
            username=SYSTEM_USERNAME,
            password=make_password(None),
            is_system=True,
            is_active=True,
            is_staff=False,
            is_superuser=False,
        )
    membership_ensure(user=system_user, organization=organization)
    return system_user


def system_user() -> User:
    return User.objects.get(id=SYSTEM_USER_ID, include_system=True)


def api_token_create(*, user: User, name: str = "") -> str:
    """Create an API token for ``user`` and return the plain token (shown once, stored hashed)."""
    if user.is_system:
        raise ValueError("system users cannot have API tokens")
    new = tokens.generate(API_TOKEN_PREFIX)
    ApiToken.objects.create(user=user, name=name, key_id=new.key_id, secret_hash=new.secret_hash)
    return new.token


def api_token_authenticate(token: str) -> User | None:
    """The active, non-system user owning this unrevoked token, or None.

    Constant-time comparison of the secret hash; ``last_used_at`` is refreshed at most once a
    minute so an API client polling hard does not turn every read into a write.
    """
    parts = tokens.split(token, API_TOKEN_PREFIX)
    if parts is None:
        return None
    key_id, secret = parts
    api_token = _unrevoked_api_token(key_id)
    user = api_token_user(api_token, secret) if api_token is not None else None
    if user is None:
        return None
    now = timezone.now()
    if api_token_touch_due(api_token, now):
        ApiToken.objects.filter(id=api_token.id).update(last_used_at=now)
    return user


# Seconds between two writes of a token's ``last_used_at``.
LAST_USED_REFRESH = 60


def api_token_user(api_token: ApiToken, secret: str) -> User | None:
    """The token's user if ``secret`` is its secret (constant time) and the user may use the
    API (active, not a system user); else None. ``api_token.user`` must be loaded."""
    if not tokens.secret_matches(secret, api_token.secret_hash):
        return None
    user = api_token.user
    if user.is_system or not user.is_active:
        return None
    return user


def api_token_touch_due(api_token: ApiToken, now: datetime) -> bool:
    """Whether a use at ``now`` must refresh ``last_used_at`` (at most once a minute)."""
    last = api_token.last_used_at
    return last is None or (now - last).total_seconds() > LAST_USED_REFRESH


@functools.cache
def _api_token_sql() -> tuple[str, tuple[Columns, Columns]]:
    groups = columns(ApiToken), columns(User)
    token, user = groups
    sql = f"""
    SELECT {token.select("t")}, {user.select("u")}
    FROM {ApiToken._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id
    WHERE t.key_id = %s AND t.revoked_at IS NULL
    """
    return sql, groups


def _unrevoked_api_token(key_id: str) -> ApiToken | None:
    """The unrevoked token with this key id, its user loaded (system users included: the
    caller refuses them). Every API request runs this, so it is written out (``config.sql``)."""
    sql, groups = _api_token_sql()
    loaded = fetch_one(sql, [key_id], *groups)
    if loaded is None:
        return None
    api_token, user = loaded
    api_token.user = user
    return api_token


@transaction.atomic
def api_token_revoke(*, token: ApiToken) -> None:
    ApiToken.objects.filter(id=token.id, revoked_at__isnull=True).update(revoked_at=timezone.now())
