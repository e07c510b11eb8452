"""The template file parser (Django-free): every validation rule, each naming its field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prebuilds.reconciliation import PrebuildSchedule, validate_schedules
from workspaces.template_files import (
    AgentSpec,
    ParameterSpec,
    PrebuildSpec,
    TemplateFileError,
    parse_template,
    read_template_file,
    validate_document,
)

REPOSITORY = Path(__file__).resolve().parent.parent.parent

# The example of DESIGN.md §9, a little extended.
VALID = '''
name = "python-dev"
display_name = "Python development"
provisioner = "local"

[[parameters]]
name = "repo"
default = "https://example.invalid/repo.git"

[[parameters]]
name = "cpus"
default = 2
description = "CPU count"

[[agents]]
name = "main"
startup_script = """
echo "hello $WORKSPACE_OWNER"
"""

[[presets]]
name = "standard"
parameters = { repo = "https://example.invalid/repo.git" }
  [presets.prebuilds]
  instances = 3
  ttl_seconds = 28800
  timezone = "UTC"
  [[presets.prebuilds.schedule]]
  cron = "* 8-18 * * 1-5"
  instances = 5
  [[presets.prebuilds.schedule]]
  cron = "* 8-18 * * 6"
  instances = 1

[[presets]]
name = "large"
parameters = { cpus = 8 }
'''

MINIMAL = """
name = "t"
provisioner = "local"
[[agents]]
name = "main"
"""


def problems(text: str, **kwargs) -> list[str]:
    with pytest.raises(TemplateFileError) as info:
        parse_template(text, **kwargs)
    return info.value.messages


def replaced(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def prebuilds_with(body: str) -> str:
    """MINIMAL plus one preset whose [presets.prebuilds] table is ``body``."""
    return MINIMAL + '[[presets]]\nname = "p"\n[presets.prebuilds]\n' + body


# -- valid files ----------------------------------------------------------------------------


def test_it_parses_a_valid_file():
    spec = parse_template(VALID)

    assert spec.name == "python-dev"
    assert spec.display_name == "Python development"
    assert spec.provisioner == "local"
    assert spec.command == ()
    assert spec.parameters == (
        ParameterSpec(name="repo", default="https://example.invalid/repo.git"),
        ParameterSpec(name="cpus", default=2, description="CPU count"),
    )
    assert spec.agents == (
        AgentSpec(name="main", startup_script='echo "hello $WORKSPACE_OWNER"\n'),
    )
    standard, large = spec.presets
    assert standard.name == "standard"
    assert dict(standard.parameters) == {"repo": "https://example.invalid/repo.git"}
    assert standard.prebuilds == PrebuildSpec(
        instances=3,
        ttl_seconds=28800,
        timezone="UTC",
        schedules=(PrebuildSchedule("* 8-18 * * 1-5", 5), PrebuildSchedule("* 8-18 * * 6", 1)),
    )
    assert large.name == "large"
    assert dict(large.parameters) == {"cpus": 8}
    assert large.prebuilds is None


def test_it_accepts_a_minimal_file():
    spec = parse_template(MINIMAL)

    assert spec.display_name == ""
    assert spec.parameters == ()
    assert spec.presets == ()
    assert spec.agents == (AgentSpec(name="main", startup_script=""),)


def test_it_accepts_parameter_defaults_of_every_scalar_type():
    text = replaced(
        "default = 2",
        'default = 2.5\n[[parameters]]\nname = "debug"\ndefault = true\n'
        '[[parameters]]\nname = "no_default"',
    )

    spec = parse_template(text)

    assert [(p.name, p.default) for p in spec.parameters] == [
        ("repo", "https://example.invalid/repo.git"),
        ("cpus", 2.5),
        ("debug", True),
        ("no_default", ""),
    ]


def test_it_accepts_a_zero_ttl_and_zero_instances():
    spec = parse_template(prebuilds_with("instances = 0\nttl_seconds = 0\n"))

    assert spec.presets[0].prebuilds == PrebuildSpec(instances=0, ttl_seconds=0)


def test_it_accepts_a_timezone_without_schedules():
    spec = parse_template(prebuilds_with('instances = 1\ntimezone = "Europe/Berlin"\n'))

    assert spec.presets[0].prebuilds.timezone == "Europe/Berlin"


def test_the_example_files_are_valid():
    for path in sorted((REPOSITORY / "examples" / "templates").glob("*.toml")):
        spec, source = read_template_file(path)
        assert source == path.read_text()
        assert spec.agents


def test_it_imports_no_django():
    code = (
        "import sys, workspaces.template_files; "
        "sys.exit(any(m == 'django' or m.startswith('django.') for m in sys.modules))"
    )

    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, env={**os.environ})

    assert result.returncode == 0


# -- name, display_name, provisioner, command -----------------------------------------------


def test_it_requires_a_name():
    assert problems(replaced('name = "python-dev"\n', "")) == ["name: required"]


@pytest.mark.parametrize(
    "name", ["Python-Dev", "python_dev", "-dev", "dev-", "", "a" * 65, "dév", "python dev"]
)
def test_it_refuses_names_that_are_not_slugs(name):
    messages = problems(replaced('name = "python-dev"', f'name = "{name}"'))

    assert len(messages) == 1
    assert messages[0].startswith("name: must be 1-64 lowercase letters, digits and dashes")


def test_it_accepts_a_name_of_64_characters():
    assert parse_template(replaced('name = "python-dev"', f'name = "{"a" * 64}"')).name == "a" * 64


def test_it_refuses_a_name_that_is_not_a_string():
    assert problems(replaced('name = "python-dev"', "name = 3")) == [
        "name: must be a string (got 3)"
    ]


def test_it_refuses_a_display_name_that_is_not_a_string():
    text = replaced('display_name = "Python development"', "display_name = [1]")

    assert problems(text) == ["display_name: must be a string (got an array)"]


def test_it_refuses_a_display_name_longer_than_the_column():
    text = replaced('display_name = "Python development"', f'display_name = "{"x" * 201}"')

    assert problems(text) == ["display_name: must be at most 200 characters (got 201)"]


def test_it_refuses_an_unknown_provisioner():
    assert problems(replaced('provisioner = "local"', 'provisioner = "docker"')) == [
        'provisioner: must be one of "local", "command" (got "docker")'
    ]


def test_it_requires_a_provisioner():
    assert problems(replaced('provisioner = "local"\n', "")) == [
        'provisioner: required (one of "local", "command")'
    ]


def test_it_requires_a_command_for_the_command_provisioner():
    assert problems(replaced('provisioner = "local"', 'provisioner = "command"')) == [
        'command: required with provisioner = "command" (["program", "arg"])'
    ]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("[]", "command: must be a non-empty array of strings (got an array)"),
        ('"run.sh"', 'command: must be a non-empty array of strings (got "run.sh")'),
        ('["run.sh", 3]', "command[1]: must be a string (got 3)"),
        ('[""]', 'command[0]: must be a string (got "")'),
    ],
)
def test_it_refuses_a_malformed_command(command, expected):
    text = replaced('provisioner = "local"', f'provisioner = "command"\ncommand = {command}')

    assert problems(text) == [expected]


def test_it_refuses_a_command_for_the_local_provisioner():
    text = replaced('provisioner = "local"', 'provisioner = "local"\ncommand = ["x"]')

    assert problems(text) == ['command: only allowed with provisioner = "command"']


def test_it_keeps_a_command_as_written_without_a_base_directory():
    text = replaced('provisioner = "local"', 'provisioner = "command"\ncommand = ["./x", "-v"]')

    assert parse_template(text).command == ("./x", "-v")


def test_it_resolves_a_relative_program_against_the_base_directory(tmp_path):
    program = tmp_path / "bin" / "provision"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (tmp_path / "templates").mkdir()
    text = replaced(
        'provisioner = "local"', 'provisioner = "command"\ncommand = ["../bin/provision", "-v"]'
    )

    spec = parse_template(text, base_dir=tmp_path / "templates")

    assert spec.command == (str(program), "-v")


def test_it_leaves_bare_and_absolute_programs_alone(tmp_path):
    for program in ("terraform", "/opt/nowhere/provision"):
        text = replaced(
            'provisioner = "local"', f'provisioner = "command"\ncommand = ["{program}"]'
        )

        assert parse_template(text, base_dir=tmp_path).command == (program,)


def test_it_refuses_a_missing_relative_program(tmp_path):
    text = replaced('provisioner = "local"', 'provisioner = "command"\ncommand = ["./nope.py"]')

    assert problems(text, base_dir=tmp_path) == [
        f"command[0]: no such file: {tmp_path / 'nope.py'} (relative paths are resolved "
        "against the template file's directory)"
    ]


def test_it_refuses_a_relative_program_that_is_not_executable(tmp_path):
    (tmp_path / "run.py").write_text("print()\n")
    text = replaced('provisioner = "local"', 'provisioner = "command"\ncommand = ["./run.py"]')

    assert problems(text, base_dir=tmp_path) == [
        f"command[0]: {tmp_path / 'run.py'} is not executable (chmod +x it)"
    ]


# -- unknown keys -----------------------------------------------------------------------------


def test_it_refuses_an_unknown_top_level_key():
    (message,) = problems(replaced('provisioner = "local"', 'provisioner = "local"\nnmae = "x"'))

    assert message.startswith("nmae: unknown key (did you mean 'name'?")


def test_it_refuses_a_typo_in_the_prebuilds_table():
    (message,) = problems(replaced("  instances = 3\n", "  instance = 3\n  instances = 3\n"))

    assert message.startswith(
        "presets[0].prebuilds.instance: unknown key (did you mean 'instances'?"
    )


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("default = 2\n", 'default = 2\ntype = "number"\n', "parameters[1].type"),
        ('name = "main"\n', 'name = "main"\nimage = "x"\n', "agents[0].image"),
        ('name = "large"\n', 'name = "large"\ncount = 1\n', "presets[1].count"),
        (
            "instances = 5\n",
            "instances = 5\n  minutes = 1\n",
            "presets[0].prebuilds.schedule[0].minutes",
        ),
    ],
)
def test_it_refuses_unknown_keys_in_every_table(old, new, path):
    (message,) = problems(replaced(old, new))

    assert message.startswith(f"{path}: unknown key")


# -- agents -----------------------------------------------------------------------------------


def test_it_requires_an_agent():
    text = MINIMAL.replace('[[agents]]\nname = "main"\n', "")

    assert problems(text) == ["agents: at least one [[agents]] table is required"]


def test_it_refuses_an_empty_agents_array():
    assert problems(MINIMAL.replace('[[agents]]\nname = "main"\n', "agents = []\n")) == [
        "agents: at least one [[agents]] table is required"
    ]


def test_it_refuses_agents_that_are_not_tables():
    assert problems(MINIMAL.replace('[[agents]]\nname = "main"\n', 'agents = "x"\n')) == [
        'agents: must be an array of tables, written [[agents]] (got "x")'
    ]
    assert problems(MINIMAL.replace('[[agents]]\nname = "main"\n', 'agents = ["x"]\n')) == [
        'agents[0]: must be a table (got "x")'
    ]


def test_it_refuses_duplicate_agent_names():
    text = MINIMAL + '[[agents]]\nname = "main"\n'

    assert problems(text) == ['agents[1].name: duplicate agent name "main"']


def test_it_refuses_an_agent_name_that_is_not_a_slug():
    (message,) = problems(MINIMAL.replace('name = "main"', 'name = "Main Agent"'))

    assert message.startswith("agents[0].name: must be 1-64 lowercase letters")


def test_it_refuses_a_startup_script_that_is_not_a_string():
    text = MINIMAL + "startup_script = ['echo']\n"

    assert problems(text) == ["agents[0].startup_script: must be a string (got an array)"]


# -- parameters -------------------------------------------------------------------------------


def test_it_refuses_duplicate_parameter_names():
    text = replaced('name = "cpus"', 'name = "repo"').replace("cpus = 8", 'repo = "x"')

    assert problems(text) == ['parameters[1].name: duplicate parameter name "repo"']


def test_it_refuses_parameter_names_that_differ_only_in_case():
    # Both would be the environment variable PARAM_REPO.
    text = replaced('name = "cpus"', 'name = "REPO"').replace("cpus = 8", 'REPO = "x"')

    assert problems(text) == [
        'parameters[1].name: duplicate parameter name "REPO" (same variable as "repo")'
    ]


@pytest.mark.parametrize("name", ["1repo", "re-po", "re po", ""])
def test_it_refuses_parameter_names_that_are_not_identifiers(name):
    (message,) = problems(replaced('name = "cpus"', f'name = "{name}"').replace("cpus = 8", ""))

    assert message.startswith("parameters[1].name: must start with a letter or underscore")


@pytest.mark.parametrize(
    ("default", "shown"),
    [
        ("[1]", "an array"),
        ("{ a = 1 }", "a table"),
        ("1979-05-27", "a date/time (1979-05-27)"),
        ("nan", "nan"),
    ],
)
def test_it_refuses_parameter_defaults_that_are_not_scalars(default, shown):
    assert problems(replaced("default = 2", f"default = {default}")) == [
        f"parameters[1].default: must be a string, number or boolean (got {shown})"
    ]


def test_it_refuses_parameters_that_are_not_an_array_of_tables():
    text = MINIMAL.replace('provisioner = "local"', 'provisioner = "local"\nparameters = 3')

    assert problems(text) == [
        "parameters: must be an array of tables, written [[parameters]] (got 3)"
    ]


# -- presets ----------------------------------------------------------------------------------


def test_it_refuses_duplicate_preset_names():
    assert problems(replaced('name = "large"', 'name = "standard"')) == [
        'presets[1].name: duplicate preset name "standard"'
    ]


def test_it_requires_a_preset_name():
    assert problems(replaced('name = "large"\n', "")) == ["presets[1].name: required"]


def test_it_refuses_an_empty_preset_name():
    assert problems(replaced('name = "large"', 'name = " "')) == [
        "presets[1].name: must not be empty"
    ]


def test_it_refuses_preset_parameters_that_are_not_declared():
    assert problems(replaced("cpus = 8", "cpu = 8")) == [
        "presets[1].parameters.cpu: not a declared parameter (declared in [[parameters]]: "
        "cpus, repo)"
    ]


def test_it_refuses_preset_parameter_values_that_are_not_scalars():
    assert problems(replaced("cpus = 8", "cpus = [8]")) == [
        "presets[1].parameters.cpus: must be a string, number or boolean (got an array)"
    ]


def test_it_refuses_preset_parameters_that_are_not_a_table():
    (message,) = problems(replaced("parameters = { cpus = 8 }", 'parameters = "cpus=8"'))

    assert message.startswith("presets[1].parameters: must be a table")


def test_it_refuses_presets_that_are_not_an_array_of_tables():
    text = MINIMAL.replace('provisioner = "local"', 'provisioner = "local"\npresets = "x"')

    assert problems(text) == ['presets: must be an array of tables, written [[presets]] (got "x")']


# -- prebuilds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [("-1", "-1"), ("true", "true"), ("1.5", "1.5"), ('"3"', '"3"')],
)
def test_it_refuses_instances_that_are_not_whole_numbers(value, shown):
    assert problems(replaced("  instances = 3", f"  instances = {value}")) == [
        f"presets[0].prebuilds.instances: must be a whole number >= 0 (got {shown})"
    ]


def test_it_refuses_instances_beyond_the_column():
    assert problems(prebuilds_with("instances = 2147483648\n")) == [
        "presets[0].prebuilds.instances: must be at most 2147483647 (got 2147483648)"
    ]


def test_it_requires_instances_in_the_prebuilds_table():
    assert problems(prebuilds_with("ttl_seconds = 60\n")) == [
        "presets[0].prebuilds.instances: required (a whole number >= 0)"
    ]


def test_it_refuses_prebuilds_that_are_not_a_table():
    text = MINIMAL + '[[presets]]\nname = "p"\nprebuilds = 3\n'

    assert problems(text) == ["presets[0].prebuilds: must be a table (got 3)"]


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1"), ("false", "false"), ("1.0", "1.0")])
def test_it_refuses_a_ttl_that_is_not_a_whole_number(value, shown):
    assert problems(replaced("ttl_seconds = 28800", f"ttl_seconds = {value}")) == [
        f"presets[0].prebuilds.ttl_seconds: must be a whole number >= 0 (got {shown})"
    ]


def test_it_refuses_an_unknown_timezone():
    assert problems(replaced('timezone = "UTC"', 'timezone = "Mars/Olympus_Mons"')) == [
        "presets[0].prebuilds.timezone: unknown timezone 'Mars/Olympus_Mons' "
        '(use an IANA name, e.g. "UTC")'
    ]


def test_it_refuses_a_timezone_that_is_not_a_string():
    assert problems(replaced('timezone = "UTC"', "timezone = 1")) == [
        "presets[0].prebuilds.timezone: must be a string (got 1)"
    ]


def test_it_requires_a_timezone_with_schedules():
    assert problems(replaced('timezone = "UTC"\n', "")) == [
        "presets[0].prebuilds.timezone: required when schedules are given "
        '(an IANA name, e.g. "UTC")'
    ]


# -- schedules --------------------------------------------------------------------------------


def test_it_refuses_a_cron_that_is_not_a_string():
    assert problems(replaced('cron = "* 8-18 * * 1-5"', "cron = 5")) == [
        "presets[0].prebuilds.schedule[0].cron: must be a string (got 5)"
    ]


def test_it_requires_a_cron():
    assert problems(replaced('cron = "* 8-18 * * 1-5"\n', "")) == [
        "presets[0].prebuilds.schedule[0].cron: required"
    ]


@pytest.mark.parametrize(("value", "shown"), [("-2", "-2"), ("true", "true")])
def test_it_refuses_schedule_instances_that_are_not_whole_numbers(value, shown):
    assert problems(replaced("instances = 5", f"instances = {value}")) == [
        f"presets[0].prebuilds.schedule[0].instances: must be a whole number >= 0 (got {shown})"
    ]


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("* 8-18 * *", "cron must have 5 fields (got 4): '* 8-18 * *'"),
        ("0 8-18 * * 1-5", "minute field must be '*' (got '0')"),
        ("* 25 * * *", "malformed cron '* 25 * * *'"),
        ("* 8 L * *", "malformed cron '* 8 L * *': unsupported day-of-month field 'L'"),
    ],
)
def test_it_refuses_malformed_crons_with_the_reconcilers_message(cron, reason):
    assert problems(replaced('cron = "* 8-18 * * 6"', f'cron = "{cron}"')) == [
        f"presets[0].prebuilds.schedule[1].cron: {reason}"
    ]


def test_it_refuses_overlapping_schedules():
    text = replaced('cron = "* 8-18 * * 6"', 'cron = "* 18-20 * * *"')

    assert problems(text) == [
        "presets[0].prebuilds.schedule[1].cron: '* 18-20 * * *' overlaps "
        "presets[0].prebuilds.schedule[0] ('* 8-18 * * 1-5'); schedules must not overlap"
    ]
    # The reconciler would ignore these schedules: the file must not get past that.
    assert validate_schedules(
        "UTC", [PrebuildSchedule("* 8-18 * * 1-5", 5), PrebuildSchedule("* 18-20 * * *", 1)]
    )


def test_it_refuses_a_schedule_that_is_not_an_array_of_tables():
    text = prebuilds_with('instances = 1\ntimezone = "UTC"\nschedule = { cron = "* * * * *" }\n')

    (message,) = problems(text)
    assert message.startswith("presets[0].prebuilds.schedule: must be an array of tables")


# -- reporting --------------------------------------------------------------------------------


def test_it_reports_every_problem_at_once():
    text = (
        VALID.replace('name = "python-dev"', 'name = "Bad Name"')
        .replace("  instances = 3", "  instances = -1")
        .replace("cpus = 8", "gpus = 1")
        .replace('provisioner = "local"', 'provisioner = "local"\nextra = 1')
    )

    messages = problems(text)

    assert [message.split(":")[0] for message in messages] == [
        "extra",
        "name",
        "presets[0].prebuilds.instances",
        "presets[1].parameters.gpus",
    ]


def test_it_reports_invalid_toml_with_line_and_column():
    assert problems('name = "x"\nprovisioner = \n') == [
        "invalid TOML: Invalid value (at line 2, column 15)"
    ]


def test_it_refuses_nul_characters():
    assert problems(MINIMAL + 'startup_script = "echo \\u0000"\n') == [
        "agents[0].startup_script: must not contain NUL characters"
    ]


def test_it_reports_an_unreadable_file(tmp_path):
    with pytest.raises(TemplateFileError) as info:
        read_template_file(tmp_path / "missing.toml")

    assert info.value.messages == [
        f"{tmp_path / 'missing.toml'}: cannot read the file: No such file or directory"
    ]


def test_it_reports_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))

    with pytest.raises(TemplateFileError) as info:
        read_template_file(path)

    assert info.value.messages == [f"{path}: not UTF-8 text (invalid byte at offset 11)"]


# Values of every TOML type, nested, under the keys the format knows (and a few it does not).
KEYS = st.sampled_from(
    [
        "name",
        "display_name",
        "provisioner",
        "command",
        "parameters",
        "agents",
        "presets",
        "default",
        "startup_script",
        "prebuilds",
        "instances",
        "ttl_seconds",
        "timezone",
        "schedule",
        "cron",
        "x",
    ]
)
SCALARS = (
    st.none().map(lambda _: "local")
    | st.text(max_size=8)
    | st.integers(-3, 3)
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.dates()
    | st.sampled_from(["command", "main", "UTC", "* * * * *", "0 * * * *"])
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=7))
def test_it_never_fails_with_anything_but_a_template_file_error(document):
    try:
        validate_document(document)
    except TemplateFileError as exc:
        assert exc.messages
        assert all(": " in message for message in exc.messages)


# -- sizing by a goal ----------------------------------------------------------------------


def test_it_parses_a_sizing_goal():
    spec = parse_template(
        prebuilds_with(
            "target_hit_rate = 0.95\nmin_instances = 1\nmax_instances = 20\ncost_per_hour = 0.12\n"
        )
    )
    prebuilds = spec.presets[0].prebuilds
    assert (prebuilds.target_hit_rate, prebuilds.min_instances, prebuilds.max_instances) == (
        0.95,
        1,
        20,
    )
    assert prebuilds.cost_per_hour == 0.12
    # No `instances`: the fallback while history is short is min_instances.
    assert prebuilds.instances == 1


def test_a_goal_may_sit_on_top_of_instances():
    spec = parse_template(
        prebuilds_with("instances = 4\ntarget_hit_rate = 0.9\nmax_instances = 9\n")
    )
    prebuilds = spec.presets[0].prebuilds
    assert (prebuilds.instances, prebuilds.min_instances, prebuilds.max_instances) == (4, 0, 9)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "target_hit_rate = 1\nmax_instances = 5\n",
            "presets[0].prebuilds.target_hit_rate: must be a number between 0 and 1, exclusive, "
            "e.g. 0.95 (got 1)",
        ),
        (
            "target_hit_rate = 0.0\nmax_instances = 5\n",
            "presets[0].prebuilds.target_hit_rate: must be a number between 0 and 1, exclusive, "
            "e.g. 0.95 (got 0.0)",
        ),
        (
            'target_hit_rate = "high"\nmax_instances = 5\n',
            "presets[0].prebuilds.target_hit_rate: must be a number between 0 and 1, exclusive, "
            'e.g. 0.95 (got "high")',
        ),
        (
            "target_hit_rate = 0.9\n",
            "presets[0].prebuilds.max_instances: required with target_hit_rate (a whole number "
            ">= 1)",
        ),
        (
            "target_hit_rate = 0.9\nmax_instances = 0\n",
            "presets[0].prebuilds.max_instances: must be at least 1 with target_hit_rate",
        ),
        (
            "target_hit_rate = 0.9\nmin_instances = 6\nmax_instances = 5\n",
            "presets[0].prebuilds.min_instances: must not be above max_instances (6 > 5)",
        ),
        (
            "target_hit_rate = 0.9\nmin_instances = -1\nmax_instances = 5\n",
            "presets[0].prebuilds.min_instances: must be a whole number >= 0 (got -1)",
        ),
        (
            "instances = 2\nmax_instances = 5\n",
            "presets[0].prebuilds.max_instances: only allowed with target_hit_rate",
        ),
        (
            "instances = 2\ncost_per_hour = -0.5\n",
            "presets[0].prebuilds.cost_per_hour: must be a number >= 0 (got -0.5)",
        ),
    ],
)
def test_it_refuses_a_bad_sizing_goal_naming_the_field(body, message):
    assert message in problems(prebuilds_with(body))
