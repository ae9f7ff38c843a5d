"""Create the demo superuser admin/admin unless it exists, and print how to log in."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

USERNAME = "admin"
PASSWORD = "admin"


class Command(BaseCommand):
    help = "Create the demo superuser (admin/admin) if missing and print its credentials."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(username=USERNAME).exists():
            note = "exists"
        else:
            User.objects.create_superuser(USERNAME, "admin@example.com", PASSWORD)
            note = "created"
        self.stdout.write(
            f"Admin user {note}. Log in at /admin/ with username {USERNAME!r}, "
            f"password {PASSWORD!r}."
        )
