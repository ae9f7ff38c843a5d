import django.db.models.deletion
from django.db import migrations, models

# Django 6.1's database-level on_delete; Django's own before (as in models.py).
DB_CASCADE = getattr(models, "DB_CASCADE", django.db.models.deletion.CASCADE)
DB_SET_NULL = getattr(models, "DB_SET_NULL", django.db.models.deletion.SET_NULL)


def _id() -> models.BigAutoField:
    return models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")


class Migration(migrations.Migration):
    dependencies = [
        ("testapp", "0003_badge"),
    ]

    operations = [
        migrations.CreateModel(
            name="Shelf",
            fields=[("id", _id()), ("name", models.CharField(max_length=100))],
        ),
        migrations.CreateModel(
            name="Book",
            fields=[
                ("id", _id()),
                ("title", models.CharField(max_length=100)),
                (
                    "shelf",
                    models.ForeignKey(
                        on_delete=DB_CASCADE, related_name="books", to="testapp.shelf"
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="Bookmark",
            fields=[
                ("id", _id()),
                ("page", models.IntegerField(default=1)),
                (
                    "book",
                    models.ForeignKey(
                        on_delete=DB_CASCADE, related_name="bookmarks", to="testapp.book"
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="Loan",
            fields=[
                ("id", _id()),
                ("who", models.CharField(max_length=100)),
                (
                    "shelf",
                    models.ForeignKey(
                        null=True,
                        on_delete=DB_SET_NULL,
                        related_name="loans",
                        to="testapp.shelf",
                    ),
                ),
            ],
        ),
    ]
