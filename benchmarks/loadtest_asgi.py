"""The demo's ASGI application without Django's thread per request, for the load test's row
that measures what that thread costs (benchmarks/loadtest.py); not deployment advice.

Django's ASGIHandler runs each request inside asgiref's ThreadSensitiveContext, so the
request's synchronous parts (every MiddlewareMixin hook, the request_started and
request_finished receivers, sync_to_async(thread_sensitive=True) calls) run in a thread
started for that request and joined when it ends. Without the context they all go to one
thread per process, which isolates no request from another's slow synchronous code: the
reason Django starts a thread per request."""

import os

from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")

import django  # noqa: E402

django.setup(set_prefix=False)


class SharedThreadASGIHandler(ASGIHandler):
    """ASGIHandler.__call__ without its ThreadSensitiveContext."""

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


application = SharedThreadASGIHandler()
