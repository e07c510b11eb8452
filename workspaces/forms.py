"""Forms of the workspace pages."""

from __future__ import annotations

from django import forms

from accounts.models import User
from workspaces import selectors
from workspaces.models import Template, TemplateVersionPreset


class PresetChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: TemplateVersionPreset) -> str:
        return f"{obj.template_version.template} · {obj.name}"


class WorkspaceNewForm(forms.Form):
    """Template, optional preset of its active version, and a name.

    Only templates and presets the user may use are offered (and accepted). The name's rules
    are the service's (one source of truth); its errors are attached to the field by the view.
    """

    template = forms.ModelChoiceField(queryset=Template.objects.none(), empty_label=None)
    preset = PresetChoiceField(
        queryset=TemplateVersionPreset.objects.none(),
        required=False,
        empty_label="No preset (template defaults)",
        help_text="A preset's prebuilt workspaces can be ready at once.",
    )
    name = forms.CharField(
        max_length=64,
        help_text="Lowercase letters, digits and dashes.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )

    def __init__(self, *args, user: User, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["template"].queryset = selectors.template_usable_queryset(user=user)
        self.fields["preset"].queryset = selectors.preset_usable_queryset(
            user=user, active_only=True
        ).order_by("template_version__template__name", "name")

    def clean(self) -> dict:
        cleaned = super().clean()
        template, preset = cleaned.get("template"), cleaned.get("preset")
        if (
            template is not None
            and preset is not None
            and preset.template_version.template_id != template.id
        ):
            self.add_error("preset", "Pick a preset of the chosen template, or none.")
        return cleaned
