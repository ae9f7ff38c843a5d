from django.db import migrations, models


def mark_derived(apps, schema_editor):  # type: ignore[no-untyped-def]
    # Before this field, derived results were told apart by their "fn:" label.
    pending = apps.get_model("tiered_cache", "PendingInvalidation")
    pending.objects.filter(model_label__startswith="fn:").update(kind="derived")


class Migration(migrations.Migration):
    dependencies = [
        ("tiered_cache", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="pendinginvalidation",
            name="kind",
            field=models.CharField(
                choices=[("group", "model rows"), ("derived", "derived results")],
                default="group",
                max_length=10,
            ),
        ),
        migrations.RunPython(mark_derived, migrations.RunPython.noop),
    ]
