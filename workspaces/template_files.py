"""Template files (DESIGN.md §9): parse and validate TOML into frozen specs.

Django-free on purpose: it imports only the standard library and the pure reconciliation core,
so it can be tested fast and reused by anything that wants to check a file before pushing it.

Guarantees of ``parse_template`` / ``read_template_file``:

- Either a fully validated ``TemplateSpec`` comes back, or one ``TemplateFileError`` is raised
  carrying **every** problem found, each message starting with the field path
  (``presets[0].prebuilds.instances: must be a whole number >= 0 (got -1)``). No input, however
  malformed (wrong types anywhere), produces any other exception.
- Unknown keys are refused at every level, so a typo (``instance = 3``) is an error rather than
  a silently ignored setting.
- Schedules accepted here are accepted by ``prebuilds.reconciliation.validate_schedules`` (the
  same function the reconciler uses), so a pushed pool never falls back to its
  ``instances`` because of a schedule the file could have been told about.
- Every value fits the database columns it will be stored in (lengths, integer range, no NUL
  characters), so a valid spec cannot fail on insert.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prebuilds.reconciliation import PrebuildSchedule, validate_schedules

PROVISIONERS = ("local", "command")

# Template and agent names appear in URLs, logs and directory names: the same rule as
# workspace names (lowercase letters, digits, inner dashes, 1-64 characters).
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
# Parameters reach startup scripts as PARAM_<NAME> environment variables.
PARAMETER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Column limits of the models the spec is stored in (workspaces/models.py).
MAX_NAME_LENGTH = 64
MAX_DISPLAY_NAME_LENGTH = 200
MAX_CRON_LENGTH = 100
MAX_TIMEZONE_LENGTH = 64
# Instance counts are PostgreSQL integers; TTLs are capped likewise (68 years is plenty).
MAX_WHOLE_NUMBER = 2_147_483_647

TEMPLATE_KEYS = (
    "name",
    "display_name",
    "provisioner",
    "command",
    "parameters",
    "agents",
    "presets",
)
PARAMETER_KEYS = ("name", "default", "description")
AGENT_KEYS = ("name", "startup_script")
PRESET_KEYS = ("name", "parameters", "prebuilds")
PREBUILD_KEYS = (
    "instances",
    "ttl_seconds",
    "timezone",
    "schedule",
    "target_hit_rate",
    "min_instances",
    "max_instances",
    "cost_per_hour",
)
SCHEDULE_KEYS = ("cron", "instances")

Scalar = str | int | float | bool


class TemplateFileError(Exception):
    """A template file that cannot be pushed; ``messages`` lists every problem found."""

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Scalar = ""
    description: str = ""


@dataclass(frozen=True)
class AgentSpec:
    name: str
    startup_script: str = ""


@dataclass(frozen=True)
class PrebuildSpec:
    """The pool a preset declares: ``instances`` outside schedules; schedules first-match.

    With ``target_hit_rate`` the reconciler sizes the pool from recorded demand within
    ``[min_instances, max_instances]`` (``prebuilds.sizing``); ``instances`` and the schedules
    are then the fallback while the history is too short (``instances`` defaults to
    ``min_instances``). ``cost_per_hour`` is stored for the economics view.
    """

    instances: int
    ttl_seconds: int | None = None  # None or 0: prebuilds never expire by age
    timezone: str = ""
    schedules: tuple[PrebuildSchedule, ...] = ()
    target_hit_rate: float | None = None
    min_instances: int | None = None
    max_instances: int | None = None
    cost_per_hour: float | None = None


@dataclass(frozen=True)
class PresetSpec:
    name: str
    parameters: Mapping[str, Scalar] = field(default_factory=lambda: MappingProxyType({}))
    prebuilds: PrebuildSpec | None = None


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    provisioner: str
    agents: tuple[AgentSpec, ...]
    display_name: str = ""
    command: tuple[str, ...] = ()  # only for the command provisioner
    parameters: tuple[ParameterSpec, ...] = ()
    presets: tuple[PresetSpec, ...] = ()


def read_template_file(path: str | os.PathLike[str]) -> tuple[TemplateSpec, str]:
    """Read, parse and validate the file at ``path``; return the spec and the source text.

    A relative ``command`` program path is resolved against the directory of the file (see
    ``parse_template``). Unreadable files and non-UTF-8 content raise ``TemplateFileError``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateFileError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateFileError(
            [f"{path}: not UTF-8 text (invalid byte at offset {exc.start})"]
        ) from None
    return parse_template(text, base_dir=path.resolve().parent), text


def parse_template(text: str, *, base_dir: Path | None = None) -> TemplateSpec:
    """Parse and validate the TOML ``text``; raise ``TemplateFileError`` with every problem.

    With ``base_dir``, a ``command`` program written as a relative path containing a slash
    (``../provisioners/x.py``) is resolved against it to an absolute path, which must be an
    executable file: template files are pushed from anywhere, and workers run the command from
    their own working directory, so only an absolute path means the same thing everywhere.
    Bare names (``terraform``) are left for a ``PATH`` lookup on the worker, and absolute paths
    are not checked, because they may exist only on the worker machines.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise TemplateFileError([f"invalid TOML: {exc}"]) from None
    except RecursionError:
        # tomllib recurses per nesting level; a hostile file can nest deeper than Python allows.
        raise TemplateFileError(["invalid TOML: arrays or tables nested too deeply"]) from None
    return validate_document(document, base_dir=base_dir)


def validate_document(document: dict[str, Any], *, base_dir: Path | None = None) -> TemplateSpec:
    """Validate a parsed TOML document (what ``tomllib`` returns); see ``parse_template``."""
    if not isinstance(document, dict):
        raise TemplateFileError([f"the document must be a table (got {_describe(document)})"])
    return _Validator(base_dir).template(document)


def timezone_problem(timezone: str) -> str | None:
    """Why ``timezone`` cannot be a preset's time zone, or None ("" is fine: no zone).

    The reconciler's own loader decides (``validate_schedules``), so a zone accepted here is
    one the reconciler can use. The admin calls this too, to be exactly as strict.
    """
    if not timezone:
        return None
    if "\0" in timezone:
        return "must not contain NUL characters"
    if len(timezone) > MAX_TIMEZONE_LENGTH:
        return f"must be at most {MAX_TIMEZONE_LENGTH} characters (got {len(timezone)})"
    # Without schedules it checks only the name.
    problem = validate_schedules(timezone, ())
    return None if problem is None else f'{problem} (use an IANA name, e.g. "UTC")'


def cron_problem(cron: str) -> str | None:
    """Why ``cron`` cannot be a schedule's cron, or None (DESIGN.md §4 rule 4: five fields,
    the minute field ``*``; the reconciler's own parser decides). The admin calls this too."""
    if "\0" in cron:
        return "must not contain NUL characters"
    if len(cron) > MAX_CRON_LENGTH:
        return f"must be at most {MAX_CRON_LENGTH} characters (got {len(cron)})"
    # Any valid zone will do: the cron rules do not depend on it.
    problem = validate_schedules("UTC", (PrebuildSchedule(cron=cron, instances=0),))
    return None if problem is None else problem.removeprefix("schedule 1: ")


def schedule_overlaps(crons: Sequence[str]) -> list[tuple[int, int]]:
    """``(later, earlier)`` index pairs of ``crons`` (each valid) that overlap, every pair.

    The reconciler treats overlapping schedules as no schedules at all, so they are refused.
    """
    schedules = [PrebuildSchedule(cron=cron, instances=0) for cron in crons]
    return [
        (later, earlier)
        for later in range(len(schedules))
        for earlier in range(later)
        if validate_schedules("UTC", (schedules[earlier], schedules[later])) is not None
    ]


def _describe(value: Any) -> str:
    """A value as the file author wrote it, short enough for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= 60 else shown[:56] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{path}.{shown}" if path else shown


def _is_scalar(value: Any) -> bool:
    # Floats must be finite: JSON (and PostgreSQL's jsonb) has no NaN or infinity.
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


class _Validator:
    """Walks the parsed document once, recording every problem instead of stopping at one."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # -- generic shapes ----------------------------------------------------------------------

    def keys(self, table: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.error(_join(path, key), f"unknown key ({hint}allowed: {', '.join(allowed)})")

    def table(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a table (got {_describe(value)})")
            return None
        self.keys(value, path, allowed)
        return value

    def tables(
        self, value: Any, path: str, allowed: tuple[str, ...]
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """The tables of an array of tables (``[[path]]``), each with its index and path."""
        if not isinstance(value, list):
            self.error(
                path, f"must be an array of tables, written [[{path}]] (got {_describe(value)})"
            )
            return []
        found = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            table = self.table(item, item_path, allowed)
            if table is not None:
                found.append((index, item_path, table))
        return found

    def string(
        self,
        table: dict[str, Any],
        key: str,
        path: str,
        *,
        required: bool = False,
        max_length: int | None = None,
    ) -> str | None:
        """The string at ``table[key]`` ("" when optional and absent), or None when invalid."""
        field_path = _join(path, key)
        if key not in table:
            if required:
                self.error(field_path, "required")
                return None
            return ""
        value = table[key]
        if not isinstance(value, str):
            self.error(field_path, f"must be a string (got {_describe(value)})")
            return None
        # PostgreSQL text and jsonb cannot hold NUL characters.
        if "\0" in value:
            self.error(field_path, "must not contain NUL characters")
            return None
        if max_length is not None and len(value) > max_length:
            self.error(field_path, f"must be at most {max_length} characters (got {len(value)})")
            return None
        return value

    def slug(self, table: dict[str, Any], key: str, path: str) -> str | None:
        value = self.string(table, key, path, required=True)
        if value is None:
            return None
        if not NAME_RE.fullmatch(value):
            self.error(
                _join(path, key),
                "must be 1-64 lowercase letters, digits and dashes, starting and ending with a "
                f"letter or digit (got {_describe(value)})",
            )
            return None
        return value

    def whole_number(self, value: Any, path: str) -> int | None:
        # bool is a subclass of int in Python; `instances = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.error(path, f"must be a whole number >= 0 (got {_describe(value)})")
            return None
        if value > MAX_WHOLE_NUMBER:
            self.error(path, f"must be at most {MAX_WHOLE_NUMBER} (got {value})")
            return None
        return value

    # -- the template ------------------------------------------------------------------------

    def template(self, document: dict[str, Any]) -> TemplateSpec:
        self.keys(document, "", TEMPLATE_KEYS)
        name = self.slug(document, "name", "")
        display_name = self.string(document, "display_name", "", max_length=MAX_DISPLAY_NAME_LENGTH)
        provisioner = self.provisioner(document)
        command = self.command(document, provisioner)
        parameters, declared = self.parameters(document.get("parameters", []))
        agents = self.agents(document)
        presets = self.presets(document.get("presets", []), declared)
        if self.errors:
            raise TemplateFileError(self.errors)
        assert name is not None and display_name is not None and provisioner is not None
        return TemplateSpec(
            name=name,
            display_name=display_name,
            provisioner=provisioner,
            command=command,
            parameters=parameters,
            agents=agents,
            presets=presets,
        )

    def provisioner(self, document: dict[str, Any]) -> str | None:
        choices = ", ".join(json.dumps(choice) for choice in PROVISIONERS)
        if "provisioner" not in document:
            self.error("provisioner", f"required (one of {choices})")
            return None
        value = document["provisioner"]
        if value not in PROVISIONERS or not isinstance(value, str):
            self.error("provisioner", f"must be one of {choices} (got {_describe(value)})")
            return None
        return value

    def command(self, document: dict[str, Any], provisioner: str | None) -> tuple[str, ...]:
        if provisioner != "command":
            if provisioner == "local" and "command" in document:
                self.error("command", 'only allowed with provisioner = "command"')
            return ()
        if "command" not in document:
            self.error("command", 'required with provisioner = "command" (["program", "arg"])')
            return ()
        value = document["command"]
        if not isinstance(value, list) or not value:
            self.error("command", f"must be a non-empty array of strings (got {_describe(value)})")
            return ()
        valid = True
        for index, item in enumerate(value):
            if not isinstance(item, str) or "\0" in item or (index == 0 and not item):
                self.error(f"command[{index}]", f"must be a string (got {_describe(item)})")
                valid = False
        if not valid:
            return ()
        return self.resolve_program(tuple(value))

    def resolve_program(self, command: tuple[str, ...]) -> tuple[str, ...]:
        program = command[0]
        if self.base_dir is None or os.path.isabs(program) or "/" not in program:
            return command
        resolved = os.path.normpath(os.path.join(self.base_dir, program))
        where = "relative paths are resolved against the template file's directory"
        if not os.path.isfile(resolved):
            self.error("command[0]", f"no such file: {resolved} ({where})")
        elif not os.access(resolved, os.X_OK):
            self.error("command[0]", f"{resolved} is not executable (chmod +x it)")
        return (resolved, *command[1:])

    def parameters(self, value: Any) -> tuple[tuple[ParameterSpec, ...], set[str]]:
        """The parameter specs and the set of declared names (for checking presets)."""
        specs = []
        declared: set[str] = set()
        seen: dict[str, str] = {}  # upper-cased name -> first spelling
        for _, path, table in self.tables(value, "parameters", PARAMETER_KEYS):
            name = self.string(table, "name", path, required=True)
            if name is not None:
                declared.add(name)
                if not PARAMETER_NAME_RE.fullmatch(name):
                    self.error(
                        f"{path}.name",
                        "must start with a letter or underscore and contain only letters, "
                        f"digits and underscores (got {_describe(name)})",
                    )
                    name = None
            if name is not None:
                # Names that differ only in case would become the same PARAM_<NAME> variable.
                first = seen.get(name.upper())
                if first is None:
                    seen[name.upper()] = name
                else:
                    clash = "" if first == name else f" (same variable as {_describe(first)})"
                    self.error(f"{path}.name", f"duplicate parameter name {_describe(name)}{clash}")
                    name = None
            default: Scalar | None = ""
            if "default" in table:
                default = table["default"]
                if not _is_scalar(default) or (isinstance(default, str) and "\0" in default):
                    self.error(
                        f"{path}.default",
                        f"must be a string, number or boolean (got {_describe(default)})",
                    )
                    default = None
            description = self.string(table, "description", path)
            if name is not None and default is not None and description is not None:
                specs.append(ParameterSpec(name=name, default=default, description=description))
        return tuple(specs), declared

    def agents(self, document: dict[str, Any]) -> tuple[AgentSpec, ...]:
        if "agents" not in document:
            self.error("agents", "at least one [[agents]] table is required")
            return ()
        tables = self.tables(document["agents"], "agents", AGENT_KEYS)
        if isinstance(document["agents"], list) and not document["agents"]:
            self.error("agents", "at least one [[agents]] table is required")
        specs = []
        names: set[str] = set()
        for _, path, table in tables:
            name = self.slug(table, "name", path)
            if name is not None and name in names:
                self.error(f"{path}.name", f"duplicate agent name {_describe(name)}")
                name = None
            if name is not None:
                names.add(name)
            script = self.string(table, "startup_script", path)
            if name is not None and script is not None:
                specs.append(AgentSpec(name=name, startup_script=script))
        return tuple(specs)

    def presets(self, value: Any, declared: set[str]) -> tuple[PresetSpec, ...]:
        specs = []
        names: set[str] = set()
        for _, path, table in self.tables(value, "presets", PRESET_KEYS):
            name = self.string(table, "name", path, required=True, max_length=MAX_NAME_LENGTH)
            if name is not None and not name.strip():
                self.error(f"{path}.name", "must not be empty")
                name = None
            if name is not None and name in names:
                self.error(f"{path}.name", f"duplicate preset name {_describe(name)}")
                name = None
            if name is not None:
                names.add(name)
            parameters = self.preset_parameters(table.get("parameters", {}), path, declared)
            prebuilds = None
            prebuilds_valid = True
            if "prebuilds" in table:
                prebuilds = self.prebuilds(table["prebuilds"], f"{path}.prebuilds")
                prebuilds_valid = prebuilds is not None
            if name is not None and parameters is not None and prebuilds_valid:
                specs.append(PresetSpec(name=name, parameters=parameters, prebuilds=prebuilds))
        return tuple(specs)

    def preset_parameters(
        self, value: Any, preset_path: str, declared: set[str]
    ) -> Mapping[str, Scalar] | None:
        path = f"{preset_path}.parameters"
        if not isinstance(value, dict):
            self.error(path, f'must be a table, e.g. {{ repo = "..." }} (got {_describe(value)})')
            return None
        valid = True
        for key, item in value.items():
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                self.error(
                    _join(path, key),
                    f"not a declared parameter (declared in [[parameters]]: {known})",
                )
                valid = False
            if not _is_scalar(item) or (isinstance(item, str) and "\0" in item):
                self.error(
                    _join(path, key),
                    f"must be a string, number or boolean (got {_describe(item)})",
                )
                valid = False
        return MappingProxyType(dict(value)) if valid else None

    def prebuilds(self, value: Any, path: str) -> PrebuildSpec | None:
        table = self.table(value, path, PREBUILD_KEYS)
        if table is None:
            return None
        errors_before = len(self.errors)
        goal = self.sizing_goal(table, path)
        instances = None
        if "instances" in table:
            instances = self.whole_number(table["instances"], f"{path}.instances")
        elif "target_hit_rate" in table:
            # A goal instead of a size: until the history is long enough, min_instances.
            instances = (goal or {}).get("min_instances") or 0
        else:
            self.error(f"{path}.instances", "required (a whole number >= 0)")
        ttl_seconds = None
        if "ttl_seconds" in table:
            ttl_seconds = self.whole_number(table["ttl_seconds"], f"{path}.ttl_seconds")
        timezone = self.timezone(table, path)
        schedules = self.schedules(table.get("schedule", []), f"{path}.schedule")
        if schedules and timezone == "":
            self.error(
                f"{path}.timezone", 'required when schedules are given (an IANA name, e.g. "UTC")'
            )
        if len(self.errors) > errors_before:
            return None
        assert instances is not None and timezone is not None
        # Belt and braces: the reconciler ignores schedules validate_schedules refuses, so
        # nothing it refuses may be pushed even if a check above missed a case.
        problem = validate_schedules(timezone, schedules)
        if problem is not None:
            self.error(path, problem)
            return None
        return PrebuildSpec(
            instances=instances,
            ttl_seconds=ttl_seconds,
            timezone=timezone,
            schedules=schedules,
            **(goal or {}),
        )

    def sizing_goal(self, table: dict[str, Any], path: str) -> dict[str, Any] | None:
        """``target_hit_rate``, ``min_instances``, ``max_instances`` and ``cost_per_hour``.

        ``max_instances`` is required with a target: it is the pool's peak for the pool limits
        (``workspaces.pool_limits``). The bounds without a target would bound nothing, so they
        are refused rather than silently ignored.
        """
        goal: dict[str, Any] = {}
        if "cost_per_hour" in table:
            cost = table["cost_per_hour"]
            if isinstance(cost, bool) or not isinstance(cost, int | float) or not cost >= 0:
                self.error(
                    f"{path}.cost_per_hour", f"must be a number >= 0 (got {_describe(cost)})"
                )
            elif cost > MAX_WHOLE_NUMBER:
                self.error(f"{path}.cost_per_hour", f"must be at most {MAX_WHOLE_NUMBER}")
            else:
                goal["cost_per_hour"] = float(cost)
        if "target_hit_rate" not in table:
            for key in ("min_instances", "max_instances"):
                if key in table:
                    self.error(f"{path}.{key}", "only allowed with target_hit_rate")
            return goal
        rate = table["target_hit_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1:
            self.error(
                f"{path}.target_hit_rate",
                f"must be a number between 0 and 1, exclusive, e.g. 0.95 (got {_describe(rate)})",
            )
        else:
            goal["target_hit_rate"] = float(rate)
        minimum = 0
        if "min_instances" in table:
            minimum = self.whole_number(table["min_instances"], f"{path}.min_instances")
        maximum = None
        if "max_instances" not in table:
            self.error(
                f"{path}.max_instances", "required with target_hit_rate (a whole number >= 1)"
            )
        else:
            maximum = self.whole_number(table["max_instances"], f"{path}.max_instances")
            if maximum == 0:
                self.error(f"{path}.max_instances", "must be at least 1 with target_hit_rate")
                maximum = None
        if minimum is not None and maximum is not None and minimum > maximum:
            self.error(
                f"{path}.min_instances",
                f"must not be above max_instances ({minimum} > {maximum})",
            )
        goal["min_instances"] = minimum
        goal["max_instances"] = maximum
        return goal

    def timezone(self, table: dict[str, Any], path: str) -> str | None:
        timezone = self.string(table, "timezone", path, max_length=MAX_TIMEZONE_LENGTH)
        if timezone:
            problem = timezone_problem(timezone)
            if problem is not None:
                self.error(f"{path}.timezone", problem)
                return None
        return timezone

    def schedules(self, value: Any, path: str) -> tuple[PrebuildSchedule, ...]:
        """Valid schedules in file order; each problem is reported with its own index."""
        schedules: list[tuple[int, PrebuildSchedule]] = []
        for index, item_path, table in self.tables(value, path, SCHEDULE_KEYS):
            cron = self.string(table, "cron", item_path, required=True, max_length=MAX_CRON_LENGTH)
            instances = None
            if "instances" not in table:
                self.error(f"{item_path}.instances", "required (a whole number >= 0)")
            else:
                instances = self.whole_number(table["instances"], f"{item_path}.instances")
            if cron is None or instances is None:
                continue
            problem = cron_problem(cron)
            if problem is not None:
                self.error(f"{item_path}.cron", problem)
                continue
            schedules.append((index, PrebuildSchedule(cron=cron, instances=instances)))
        # Overlap pair by pair (not just the first pair), so every clash is reported.
        for later, earlier in schedule_overlaps([schedule.cron for _, schedule in schedules]):
            (later_index, later_schedule), (earlier_index, earlier_schedule) = (
                schedules[later],
                schedules[earlier],
            )
            self.error(
                f"{path}[{later_index}].cron",
                f"{later_schedule.cron!r} overlaps {path}[{earlier_index}] "
                f"({earlier_schedule.cron!r}); schedules must not overlap",
            )
        return tuple(schedule for _, schedule in schedules)
