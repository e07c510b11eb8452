"""Record why a failed job failed (``ProvisionerJob.failure_kind``, see ``FailureKind``).

Existing failed jobs are classified from the error messages the executor and the sweeps have
always written: a lost worker, an unserved host queue and an interrupted worker are
infrastructure failures; every other failure stays a template failure, as it counted before.
"""

from django.db import migrations, models

BACKFILL = """
UPDATE workspaces_provisionerjob
   SET failure_kind = CASE
         WHEN error = 'Worker lost (heartbeat timeout).'
           OR (error LIKE 'Worker host %' AND error LIKE '% unavailable.')
           OR error LIKE 'The worker was interrupted %'
         THEN 'infrastructure'
         ELSE 'template'
       END
 WHERE status = 'failed'
"""


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0002_system_rows"),
        ("workspaces", "0003_claim_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="provisionerjob",
            name="failure_kind",
            field=models.CharField(
                blank=True,
                choices=[("template", "Template"), ("infrastructure", "Infrastructure")],
                max_length=16,
            ),
        ),
        migrations.RunSQL(BACKFILL, migrations.RunSQL.noop, elidable=True),
        migrations.AddConstraint(
            model_name="provisionerjob",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("failure_kind", ""),
                    models.Q(
                        ("failure_kind__in", ["template", "infrastructure"]),
                        ("status", "failed"),
                    ),
                    _connector="OR",
                ),
                name="job_failure_kind_valid",
            ),
        ),
    ]
