"""The demo served with django-debug-toolbar and tiered_cache's panel, as
demo_project/settings.py configures them when DEBUG is on, over this test run's database
and Redis prefix (tests/settings.py): the server of tests/test_panels_browser.py."""

from demo_project import settings as _demo
from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS as _SUITE_APPS
from tests.settings import TIERED_CACHE as _SUITE_CACHE

assert _demo.DEBUG_TOOLBAR, "serve with DJANGO_DEBUG=1 and django-debug-toolbar installed"
DEBUG = True
INSTALLED_APPS = [*_SUITE_APPS, "debug_toolbar"]
MIDDLEWARE = _demo.MIDDLEWARE
ROOT_URLCONF = "demo_project.urls"

# The server idles while the browser clicks: with the default window (0.3 s) each page's first
# read waits up to 50 ms for a heartbeat and, on a loaded machine, may read the database
# instead ("bus not trusted", as the panel would rightly say). The tests want the tiers.
TIERED_CACHE = {**_SUITE_CACHE, "BUS_TRUST_WINDOW": 30.0}
