"""Default organization, the system user ``prebuilds``, and the trigger that protects it."""

from django.contrib.auth.hashers import make_password
from django.db import migrations

SYSTEM_USER_ID = "c42fdf75-3097-471c-8c33-fb52454d81c0"

PROTECT_SYSTEM_USERS = """
CREATE OR REPLACE FUNCTION accounts_protect_system_users() RETURNS trigger AS $$
BEGIN
    -- System users own prebuilds; changing or deleting one would orphan pools or open a login.
    IF TG_OP = 'DELETE' AND OLD.is_system THEN
        RAISE EXCEPTION 'system user "%" cannot be deleted', OLD.username
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND (OLD.is_system OR NEW.is_system) THEN
        RAISE EXCEPTION 'system user "%" cannot be modified', OLD.username
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER accounts_protect_system_users
    BEFORE UPDATE OR DELETE ON accounts_user
    FOR EACH ROW EXECUTE FUNCTION accounts_protect_system_users();
"""

UNPROTECT_SYSTEM_USERS = """
DROP TRIGGER IF EXISTS accounts_protect_system_users ON accounts_user;
DROP FUNCTION IF EXISTS accounts_protect_system_users();
"""


def create_system_rows(apps, schema_editor):
    Organization = apps.get_model("accounts", "Organization")
    User = apps.get_model("accounts", "User")
    Membership = apps.get_model("accounts", "Membership")
    organization, _ = Organization.objects.get_or_create(
        slug="default", defaults={"name": "Default"}
    )
    user, _ = User.objects.get_or_create(
        id=SYSTEM_USER_ID,
        defaults={
            "username": "prebuilds",
            "password": make_password(None),
            "is_system": True,
            "is_active": True,
        },
    )
    Membership.objects.get_or_create(
        user=user, organization=organization, defaults={"role": "member"}
    )


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]

    operations = [
        migrations.RunPython(create_system_rows, migrations.RunPython.noop),
        migrations.RunSQL(PROTECT_SYSTEM_USERS, UNPROTECT_SYSTEM_USERS),
    ]
