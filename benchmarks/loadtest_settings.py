"""Settings of the load test's rows of Django's own floor (benchmarks/loadtest.py): the
demo's settings without any middleware, served the same way under WSGI and ASGI. The
load-test views need none (they read no session or user, and the POST is csrf_exempt)."""

from demo_project.settings import *  # noqa: F403

MIDDLEWARE: list[str] = []
