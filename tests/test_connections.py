"""The L2 tier's connections (tiers/remote.py): each thread holds its own; a thread that
ends gives them back for the next one, as Django's thread per request under ASGI needs;
a connection left with replies nobody read is never handed on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from tests.cache_fixtures import counters
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import clear_local
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """fn's result, run in a thread that has ended (and let go of what it held) on return."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def held() -> list[Any]:
    """The connections this thread holds."""
    h = getattr(redis_tier._local, "held", None)
    return list(h.conns.values()) if h is not None else []


def stored_user() -> User:
    """A user whose pk entry is in L2 (and not in this process's L1)."""
    user = UserFactory(first_name="held")
    User.objects.get_cached(pk=user.pk)
    redis_tier.wait_for_fills()
    clear_local()
    return user


def l2_read(pk: int) -> tuple[str, list[Any]]:
    """An L2 read of the user (L1 emptied first), and the connections the thread used."""
    clear_local()
    name = User.objects.get_cached(pk=pk).first_name
    return name, held()


def test_a_thread_that_ended_gives_its_connection_to_the_next() -> None:
    user = stored_user()
    name, first = in_thread(lambda: l2_read(user.pk))
    assert name == "held" and first
    name, second = in_thread(lambda: l2_read(user.pk))
    assert name == "held"
    assert [c is f for c, f in zip(second, first, strict=True)] == [True] * len(first)


@pytest.mark.asyncio
async def test_requests_under_asgi_read_l2_on_the_same_connection() -> None:
    """Django runs each ASGI request's synchronous code (here the L2 read of aget_cached)
    in a thread started for that request: twenty requests, one connection."""
    user = await sync_to_async(stored_user)()
    used: list[Any] = []
    for _ in range(20):
        clear_local()  # the read goes past L1 to L2, in the request's thread
        async with ThreadSensitiveContext():
            got = await User.objects.aget_cached(pk=user.pk)
            used.extend(await sync_to_async(held)())
        assert got.first_name == "held"
    assert used and all(c is used[0] for c in used), f"{len({id(c) for c in used})} connections"


def test_a_connection_left_with_unread_replies_is_not_handed_on() -> None:
    user = stored_user()

    def stop_mid_exchange() -> list[Any]:
        l2_read(user.pk)
        conns = held()
        for conn in conns:
            redis_tier._send_packed(conn, [("PING",)])  # sent; its reply is never read
        return conns

    left = in_thread(stop_mid_exchange)
    name, used = in_thread(lambda: l2_read(user.pk))
    assert name == "held"
    assert left and not any(c is old for c in used for old in left)
    assert all(getattr(c, "_sock", None) is None for c in left)  # closed, not leaked


def test_reset_closes_the_connections_given_back() -> None:
    user = stored_user()
    _, given_back = in_thread(lambda: l2_read(user.pk))
    redis_tier.reset()
    assert all(getattr(c, "_sock", None) is None for c in given_back)
    name, used = in_thread(lambda: l2_read(user.pk))
    assert name == "held" and not any(c is old for c in used for old in given_back)


def test_reset_leaves_a_running_thread_its_connection() -> None:
    """reset() (settings changed, in tests) drops every thread's holdings at once, from
    its own thread; another thread still running may be mid-exchange, so reset() neither
    closes its connection nor gives it to the idle list it then closes."""
    user = stored_user()
    read, finish = threading.Event(), threading.Event()
    got: dict[str, Any] = {}

    def reader() -> None:
        got["name"], got["conns"] = l2_read(user.pk)
        read.set()
        finish.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert read.wait(10)
        redis_tier.reset()
        assert got["name"] == "held" and got["conns"]
        assert all(getattr(c, "_sock", None) is not None for c in got["conns"])
    finally:
        finish.set()
        t.join()


def test_holdings_dropped_while_their_thread_runs_are_not_handed_on() -> None:
    """The thread-local storage can let go of a thread's holdings while the thread still
    runs and holds a connection it is about to use (reset() swapping it in the middle of
    that thread's _conn()): only a thread's end gives connections back."""
    user = stored_user()
    still_used: list[Any] = []

    def drop_own_holdings() -> None:
        l2_read(user.pk)
        still_used.extend(held())
        redis_tier._local = threading.local()  # the old storage freed in this thread

    in_thread(drop_own_holdings)
    name, used = in_thread(lambda: l2_read(user.pk))
    assert name == "held" and still_used
    assert not any(c is old for c in used for old in still_used)


def test_unread_replies_on_a_thread_s_own_connection_are_not_read_as_its_next_reply() -> None:
    user = stored_user()

    def read_after_unread() -> tuple[str, bool]:
        l2_read(user.pk)
        (conn,) = held()[:1]
        sock = conn._sock
        redis_tier._send_packed(conn, [("PING",)])  # its reply is never read
        before = counters(User)["l2_hits"]
        name, again = l2_read(user.pk)
        assert counters(User)["l2_hits"] == before + 1  # served from L2, not the database
        return name, again[0] is conn and again[0]._sock is not sock

    name, reconnected = in_thread(read_after_unread)
    assert name == "held" and reconnected
