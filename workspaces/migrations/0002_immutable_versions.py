"""A template version is immutable: its definition columns cannot change once written."""

from django.db import migrations

PROTECT_VERSIONS = """
CREATE OR REPLACE FUNCTION workspaces_protect_template_versions() RETURNS trigger AS $$
BEGIN
    -- Builds and prebuilds refer to a version by id and expect it to mean the same thing forever.
    IF NEW.template_id IS DISTINCT FROM OLD.template_id
       OR NEW.number IS DISTINCT FROM OLD.number
       OR NEW.provisioner IS DISTINCT FROM OLD.provisioner
       OR NEW.provisioner_config IS DISTINCT FROM OLD.provisioner_config
       OR NEW.parameters IS DISTINCT FROM OLD.parameters
       OR NEW.agents IS DISTINCT FROM OLD.agents
       OR NEW.source IS DISTINCT FROM OLD.source THEN
        RAISE EXCEPTION 'template version % is immutable; push a new version instead', OLD.id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER workspaces_protect_template_versions
    BEFORE UPDATE ON workspaces_templateversion
    FOR EACH ROW EXECUTE FUNCTION workspaces_protect_template_versions();
"""

UNPROTECT_VERSIONS = """
DROP TRIGGER IF EXISTS workspaces_protect_template_versions ON workspaces_templateversion;
DROP FUNCTION IF EXISTS workspaces_protect_template_versions();
"""


class Migration(migrations.Migration):
    dependencies = [("workspaces", "0001_initial")]

    operations = [migrations.RunSQL(PROTECT_VERSIONS, UNPROTECT_VERSIONS)]
