"""``python manage.py stop_workspaces``: stop every local workspace process of ``DATA_DIR``."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from workspaces.stopping import stop_workspaces, workspace_processes


class Command(BaseCommand):
    help = (
        "Stop every local workspace process (agents and what their startup scripts started) of "
        "DATA_DIR, whether or not Warmstart runs; workspace records and directories are kept."
    )

    def handle(self, *args, **options) -> None:
        count = stop_workspaces(settings.DATA_DIR, lambda line: self.stdout.write(line))
        left = workspace_processes(settings.DATA_DIR)
        self.stdout.write(f"stopped the processes of {count} workspace(s)")
        if left:
            raise CommandError(f"still running after the stop: pids {sorted(left)}")
