"""Forms of the operator dashboards. Error messages name the field, so they read on their own
(in a flash message, a screen reader's announcement, or next to the control)."""

from __future__ import annotations

from django import forms

from workspaces.models import JobStatus, Template


class DesiredInstancesForm(forms.Form):
    """The pool size of a preset; empty means "declares no prebuilds".

    The upper bounds (per preset, per organization) are the service's to check
    (``prebuilds.services.preset_set_desired_instances``), as for every other entry point.
    """

    instances = forms.IntegerField(
        label="Desired instances",
        required=False,
        min_value=0,
        help_text="Empty: the preset keeps no prebuilds.",
        error_messages={
            "invalid": "Desired instances must be a whole number.",
            "min_value": "Desired instances must be 0 or more.",
        },
        widget=forms.NumberInput(attrs={"inputmode": "numeric", "min": 0}),
    )


class PauseForm(forms.Form):
    """Pause (true) or resume (false) the reconciler."""

    paused = forms.TypedChoiceField(
        label="Paused",
        choices=(("true", "pause"), ("false", "resume")),
        coerce=lambda value: value == "true",
        error_messages={
            "required": "Paused must be given (true or false).",
            "invalid_choice": "Paused must be true or false.",
        },
    )


class WorkspaceFilterForm(forms.Form):
    """Filters of the staff workspace list; every field optional, bad values ignored by the
    view (a filter form should never turn a page into an error)."""

    owner = forms.CharField(label="Owner", required=False, max_length=150)
    template = forms.ModelChoiceField(
        label="Template",
        queryset=Template.objects.none(),
        required=False,
        empty_label="any template",
    )
    prebuilds = forms.BooleanField(label="Prebuilds only", required=False)
    status = forms.ChoiceField(
        label="Latest build",
        required=False,
        choices=(("", "any status"), *JobStatus.choices),
    )

    def __init__(self, *args, templates=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if templates is not None:
            self.fields["template"].queryset = templates
            # One query for the choices: the labels need the organization.
            self.fields["template"].label_from_instance = lambda t: (
                f"{t.organization.name} / {t.name}"
            )
