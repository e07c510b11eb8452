"""``python manage.py create_api_token USERNAME``: print a new API token and nothing else."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from accounts.models import User
from accounts.services import api_token_create


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it (it is stored hashed, shown once)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the token")

    def handle(self, *args, username: str, name: str, **options) -> None:
        # System users are invisible here, so they get the same answer as an unknown name.
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"username: no user named {username!r}")
        if not user.is_active:
            raise CommandError(f"username: user {username!r} is inactive")
        self.stdout.write(api_token_create(user=user, name=name))
