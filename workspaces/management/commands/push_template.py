"""``python manage.py push_template PATH [--organization SLUG] [--no-activate] [--plan [--json]]``.

DESIGN.md §8. With ``--plan`` it changes nothing and prints, per pool, what activating the file
would do (``prebuilds.push_plan``); a file the push would refuse is refused the same way.

Prints the id of the new template version and nothing else, so scripts can capture it. Any
problem (unreadable file, invalid TOML, invalid template, unknown organization) is reported all
at once as a ``CommandError`` (exit status 1) and nothing is written; so are instance counts
above ``PREBUILDS_MAX_INSTANCES_PER_PRESET`` / ``_PER_ORGANIZATION``, once the file is valid.
"""

from __future__ import annotations

import json as _json

from django.core.management.base import BaseCommand, CommandError

from accounts.models import DEFAULT_ORGANIZATION_SLUG, Organization
from prebuilds.push_plan import plan_lines, template_push_plan
from workspaces.pool_limits import PoolSizeError
from workspaces.template_files import TemplateFileError, read_template_file
from workspaces.template_services import template_push


class Command(BaseCommand):
    help = (
        "Create a template (or a new version of it) from a TOML template file and print the "
        "version id. Relative command paths in the file resolve against the file's directory."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", help="the template file (TOML)")
        parser.add_argument(
            "--organization",
            default=DEFAULT_ORGANIZATION_SLUG,
            metavar="SLUG",
            help=f"organization slug (default: {DEFAULT_ORGANIZATION_SLUG})",
        )
        parser.add_argument(
            "--no-activate",
            action="store_true",
            help="keep the current active version; the new version is stored but not used",
        )
        parser.add_argument(
            "--plan",
            action="store_true",
            help="change nothing: print per pool the prebuilds deleted and created and the "
            "expected cold-build window",
        )
        parser.add_argument(
            "--json", action="store_true", help="with --plan: print the plan as one JSON document"
        )

    def handle(
        self,
        *args,
        path: str,
        organization: str,
        no_activate: bool,
        plan: bool,
        json: bool,
        **options,
    ) -> None:
        problems: list[str] = []
        if json and not plan:
            problems.append("--json: only with --plan (a push prints the version id)")
        spec = source = None
        try:
            spec, source = read_template_file(path)
        except TemplateFileError as exc:
            problems.extend(exc.messages)
        found = Organization.objects.filter(slug=organization).first()
        if found is None:
            problems.append(f"--organization: no organization with slug {organization!r}")
        if problems:
            raise _not_pushed(path, problems)
        assert spec is not None and source is not None and found is not None
        try:
            if plan:
                self._plan(found, spec, source, activate=not no_activate, as_json=json)
                return
            version = template_push(
                organization=found, spec=spec, source=source, activate=not no_activate
            )
        except PoolSizeError as exc:  # too many instances: nothing was written
            raise _not_pushed(path, exc.messages) from None
        self.stdout.write(str(version.id))

    def _plan(self, organization, spec, source, *, activate: bool, as_json: bool) -> None:
        result = template_push_plan(
            organization=organization, spec=spec, source=source, activate=activate
        )
        if as_json:
            self.stdout.write(_json.dumps(result.as_json(), indent=2))
        else:
            self.stdout.write("\n".join(plan_lines(result)))


def _not_pushed(path: str, problems: list[str]) -> CommandError:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return CommandError(f"{path}: not pushed, {count}:\n" + "\n".join(f"  {p}" for p in problems))
