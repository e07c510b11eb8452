"""New users join the default organization as members (DESIGN.md §3).

A receiver rather than a service call because users are created by many doors we do not own
(``createsuperuser``, the admin, tests); every one of them must give the same result.
"""

from __future__ import annotations

from django.db.models.signals import post_save
from django.dispatch import receiver

from accounts.models import User


@receiver(post_save, sender=User, dispatch_uid="accounts.join_default_organization")
def join_default_organization(sender, instance: User, created: bool, raw: bool, **kwargs) -> None:
    if created and not raw and not instance.is_system:
        from accounts.services import membership_ensure_default

        membership_ensure_default(user=instance)
