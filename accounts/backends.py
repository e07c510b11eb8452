"""Authentication backend: Django's model backend, refusing system users on every path."""

from __future__ import annotations

from django.contrib.auth.backends import ModelBackend


class UserBackend(ModelBackend):
    """Password and session authentication.

    System users are already invisible to ``User.objects`` (so neither ``authenticate`` nor
    ``get_user`` can find them); ``user_can_authenticate`` refuses them as well, so a future
    change to the manager cannot quietly open a login path.
    """

    def user_can_authenticate(self, user) -> bool:  # type: ignore[override]
        return not getattr(user, "is_system", False) and super().user_can_authenticate(user)
