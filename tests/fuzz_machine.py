"""A differential fuzzer: random sequences of Django writes on the test app, and after every
step every read through the cache compared with the ORM's own read (guarantee 11).

The oracle is the ORM itself, never a Python model of the data: after each step the
invariant reads every known row (and a few that never existed) through ``get_cached`` /
``get_many_cached`` / related managers / a cached function, twice in a row (the L1 hit
path) and once more after ``tiered_cache.clear_local()`` (the L2 path), and compares each
answer with what ``.get()`` / ``in_bulk()`` / the undecorated function answer.

``ReadCommittedMachine`` reads through the default alias; ``RepeatableReadMachine`` reads
through the "snapshot" alias (the same database in REPEATABLE READ), writes still going
through the default alias. tests/test_fuzz.py runs them.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    connection,
    connections,
    models,
    transaction,
)
from django.db.models import Count, F, Q
from django.db.models.deletion import ProtectedError, RestrictedError
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
)

import tiered_cache
from tests.testapp.models import (
    Account,
    Badge,
    Book,
    Bookmark,
    Code,
    Document,
    Gadget,
    ItalianRestaurant,
    Item,
    Label,
    Loan,
    Owner,
    Place,
    ProxyAccount,
    Restaurant,
    Shelf,
    Tenant,
)

# -- small alphabets, so that unique values collide and lookups hit old keys ------------

TENANT_NAMES = [f"t{i}" for i in range(5)]
EMAILS = [f"e{i}@x.io" for i in range(7)]
LABEL_NAMES = [f"l{i}" for i in range(4)]
CODES = [f"c{i}" for i in range(4)]
DOC_IDS = [uuid.UUID(int=i) for i in range(1, 5)]
NAMES = ["a", "b", "c"]
# Badge codes: None is a value many rows may hold (NULL is unique to nothing).
BADGE_CODES = ["b0", "b1", None]
# Where a raw UPDATE sits in its statement (op_raw_sql_seen).
RAW_SQL_FORMS = [
    "plain",
    "comment",
    "explain",
    "after_select",
    "from_tenant",
    "unspaced",
    "or_on_a_line",
    "upsert_on_lines",
]

tenant_names = st.sampled_from(TENANT_NAMES)
emails = st.sampled_from(EMAILS)
label_names = st.sampled_from(LABEL_NAMES)
codes = st.sampled_from(CODES)
badge_codes = st.sampled_from(BADGE_CODES)
doc_ids = st.sampled_from(DOC_IDS)
names = st.sampled_from(NAMES)
balances = st.integers(-2, 3)
json_values = st.sampled_from([{}, {"a": 1}, {"a": [1, 2]}, {"b": {"c": None}}])
tag_lists = st.sampled_from([[], ["x"], ["x", "y"]])
place_kinds = st.sampled_from([Place, Restaurant, ItalianRestaurant])

# Primary keys that never exist (negative results get cached too).
NEVER: dict[type[models.Model], list[Any]] = {
    Tenant: [0, 987654321],
    Account: [0, 987654321],
    Place: [0, 987654321],
    Owner: [0],
    Item: [0, 987654321],
    Label: [0],
    Document: [uuid.UUID(int=999)],
    Code: ["nope"],
    Gadget: [0],
    Badge: [0],
    Book: [0],
    Bookmark: [0],
    Loan: [0],
}
FAMILY = {ProxyAccount: Account, Restaurant: Place, ItalianRestaurant: Place}
PK_MODELS = [
    Tenant,
    Account,
    ProxyAccount,
    Place,
    Restaurant,
    ItalianRestaurant,
    Owner,
    Item,
    Label,
    Document,
    Code,
    Gadget,
    Badge,
    Book,
    Bookmark,
    Loan,
]
# Deleting everything through Django, children first (the cache must see it).
CLEAR_ORDER = [
    Bookmark,
    Book,
    Loan,
    Shelf,
    Item,
    Owner,
    Label,
    Account,
    Tenant,
    Place,
    Document,
    Code,
    Gadget,
    Badge,
]


class Rollback(Exception):
    """Raised inside atomic() to roll the block (or a savepoint) back."""


class CallbackBoom(Exception):
    """Raised by an on_commit callback."""


SKIPPED = (IntegrityError, ProtectedError, RestrictedError, ObjectDoesNotExist)


# -- what a read answered ---------------------------------------------------------------


def row(obj: models.Model) -> tuple[Any, ...]:
    return (
        type(obj).__qualname__,
        obj._state.db,
        tuple((f.attname, getattr(obj, f.attname)) for f in obj._meta.concrete_fields),
    )


def shape(value: Any) -> Any:
    if isinstance(value, models.Model):
        return ("row", row(value))
    if isinstance(value, dict):
        return ("dict", sorted(((k, shape(v)) for k, v in value.items()), key=repr))
    return ("value", value)


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        value = fn()
    except Exception as exc:  # compared, not hidden
        if isinstance(exc, ObjectDoesNotExist):
            return ("raises", type(exc).__qualname__)
        return ("raises", type(exc).__qualname__, str(exc)[:200])
    return shape(value)


# -- a cached function of two models ---------------------------------------------------


@tiered_cache.cached(depends_on=[Account, Tenant])
def tenant_summary(tenant_pk: int, alias: str) -> Any:
    tenant = Tenant.objects.using(alias).filter(pk=tenant_pk).first()
    if tenant is None:
        return None
    accounts = Account.objects.using(alias).filter(tenant_id=tenant_pk)
    return (tenant.name, tuple(sorted(accounts.values_list("email", "balance"))))


# -- a second process ------------------------------------------------------------------


def child_read(label: str, alias: str, lookup: dict[str, Any]) -> Any:
    """Runs in the spawned worker: one read through get_cached there."""
    from django.apps import apps

    return outcome(lambda: manager_for(apps.get_model(label), alias).get_cached(**lookup))


def manager_for(model: type[models.Model], alias: str) -> Any:
    """The model's manager reading from `alias`: the manager itself for the default alias,
    as most code reads (and as reads.hit() serves), db_manager() for another."""
    if alias == DEFAULT_DB_ALIAS:
        return model.objects
    return model.objects.db_manager(alias)


def child_orm_read(label: str, alias: str, lookup: dict[str, Any]) -> Any:
    from django.apps import apps

    model = apps.get_model(label)
    return outcome(lambda: model.objects.db_manager(alias).get(**lookup))


_worker: list[Any] = []


def get_worker() -> Any:
    if not _worker:
        from tests.processes import Worker

        _worker.append(Worker())
    return _worker[0]


def close_worker() -> None:
    while _worker:
        _worker.pop().close()


# -- helpers -----------------------------------------------------------------------------


def wait_for_fills() -> None:
    from tiered_cache.tiers import redis_tier

    wait = getattr(redis_tier, "wait_for_fills", None)
    if callable(wait):
        wait()


def in_thread(fn: Callable[[], Any], timeout: float = 30) -> Any:
    """fn() in a new thread with its own connections (closed at its end)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # reported by the caller
            out["value"] = exc
            out["tb"] = traceback.format_exc()
        finally:
            connections.close_all()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "a reader thread did not finish"
    if isinstance(out.get("value"), BaseException):
        raise AssertionError(f"in a thread: {out['tb']}")
    return out["value"]


def guarded(fn: Callable[[], Any]) -> Any:
    """A write that may legitimately fail (unique value taken, PROTECT, row gone). Inside
    atomic() it gets a savepoint so a failure leaves the block usable; in autocommit it runs
    as it is (a failed statement rolls itself back)."""
    try:
        if connection.in_atomic_block:
            with transaction.atomic():
                return fn()
        return fn()
    except SKIPPED as exc:
        note(f"  (skipped: {type(exc).__name__}: {str(exc)[:100]})")
        return exc


def pks_of(model: type[models.Model]) -> list[Any]:
    return sorted(model._base_manager.values_list("pk", flat=True), key=str)


class Probe:
    __slots__ = ("what", "cached", "orm")

    def __init__(self, what: str, cached: Callable[[], Any], orm: Callable[[], Any]):
        self.what, self.cached, self.orm = what, cached, orm


# -- the machine -------------------------------------------------------------------------


class CacheMachine(RuleBasedStateMachine):
    READ_ALIAS = "default"
    # Counted across examples (printed by the test).
    counts: Counter = Counter()

    tenants = Bundle("tenants")
    accounts = Bundle("accounts")
    places = Bundle("places")
    owners = Bundle("owners")
    items = Bundle("items")
    labels = Bundle("labels")
    documents = Bundle("documents")
    gadgets = Bundle("gadgets")
    badges = Bundle("badges")
    shelves = Bundle("shelves")

    def __init__(self) -> None:
        super().__init__()
        type(self).counts["examples"] += 1
        # Every pk this example has seen (deleted ones stay: their absence is checked).
        self.seen: dict[type[models.Model], set[Any]] = {m: set() for m in NEVER}
        for model in CLEAR_ORDER:
            model.objects.all().delete()
        tiered_cache.clear_local()

    # -- bookkeeping ---------------------------------------------------------------------
    def step(self, name: str) -> None:
        type(self).counts["steps"] += 1
        type(self).counts["rule:" + name] += 1

    def saw(self, model: type[models.Model], *pks: Any) -> None:
        self.seen[FAMILY.get(model, model)].update(p for p in pks if p is not None)

    def mgr(self, model: type[models.Model]) -> Any:
        return manager_for(model, self.READ_ALIAS)

    def orm(self, model: type[models.Model]) -> Any:
        return model.objects.using(self.READ_ALIAS)

    def candidates(self, model: type[models.Model]) -> list[Any]:
        base = FAMILY.get(model, model)
        pks = set(self.seen[base]) | set(pks_of(base))
        self.seen[base] |= pks
        return sorted(pks, key=str) + NEVER[base]

    # -- the oracle ----------------------------------------------------------------------
    def probes(self, models_only: Iterable[type[models.Model]] | None = None) -> list[Probe]:
        only = set(models_only) if models_only is not None else None
        out: list[Probe] = []
        alias = self.READ_ALIAS

        def want(m: type[models.Model]) -> bool:
            return only is None or m in only or FAMILY.get(m, m) in only

        for model in PK_MODELS:
            if not want(model):
                continue
            pks = self.candidates(model)
            for pk in pks:
                out.append(
                    Probe(
                        f"{model.__name__}.get_cached(pk={pk!r})",
                        lambda m=model, p=pk: self.mgr(m).get_cached(pk=p),
                        lambda m=model, p=pk: self.mgr(m).get(pk=p),
                    )
                )
            out.append(
                Probe(
                    f"{model.__name__}.get_many_cached({pks!r})",
                    lambda m=model, p=pks: self.mgr(m).get_many_cached(p),
                    lambda m=model, p=pks: self.orm(m).in_bulk(p),
                )
            )
        tenant_pks = self.candidates(Tenant) if want(Tenant) or want(Account) else []
        if want(Tenant):
            out += self.lookup_probes(Tenant, "name", TENANT_NAMES)
        if want(Account):
            for model in (Account, ProxyAccount):
                for email in EMAILS:
                    out.append(
                        Probe(
                            f"{model.__name__}.get_cached(email={email!r})",
                            lambda m=model, e=email: self.mgr(m).get_cached(email=e),
                            lambda m=model, e=email: self.mgr(m).get(email=e),
                        )
                    )
            for tpk in tenant_pks:
                for email in EMAILS:
                    out.append(
                        Probe(
                            f"Account.get_cached(tenant={tpk!r}, email={email!r})",
                            lambda t=tpk, e=email: self.mgr(Account).get_cached(tenant=t, email=e),
                            lambda t=tpk, e=email: self.mgr(Account).get(tenant=t, email=e),
                        )
                    )
                # An instance built from a str pk, as a view builds one from its URL.
                built = Tenant(pk=str(tpk))
                out.append(
                    Probe(
                        f"Account.get_cached(tenant=Tenant(pk={str(tpk)!r}), email={EMAILS[0]!r})",
                        lambda t=built: self.mgr(Account).get_cached(tenant=t, email=EMAILS[0]),
                        lambda t=built: self.mgr(Account).get(tenant=t, email=EMAILS[0]),
                    )
                )
            # Reverse foreign key: every account through every tenant.
            tenants = list(self.orm(Tenant).order_by("pk"))
            acc_pks = self.candidates(Account)
            # The same relation through instances built from a str pk (the ORM prepares the
            # pk for its filter; the rows keep their own foreign key).
            tenants += [Tenant(pk=str(t.pk)) for t in tenants[:2]]
            for tenant in tenants:
                for pk in acc_pks:
                    out.append(
                        Probe(
                            f"Tenant({tenant.pk}).accounts.get_cached(pk={pk!r})",
                            lambda t=tenant, p=pk: t.accounts.get_cached(pk=p),
                            lambda t=tenant, p=pk: t.accounts.get(pk=p),
                        )
                    )
                out.append(
                    Probe(
                        f"Tenant({tenant.pk}).accounts.get_many_cached({acc_pks!r})",
                        lambda t=tenant, p=acc_pks: t.accounts.get_many_cached(p),
                        lambda t=tenant, p=acc_pks: t.accounts.in_bulk(p),
                    )
                )
            for tpk in tenant_pks:
                out.append(
                    Probe(
                        f"tenant_summary({tpk!r})",
                        lambda t=tpk: tenant_summary(t, alias),
                        lambda t=tpk: tenant_summary.fn(t, alias),
                    )
                )
        if want(Label):
            out += self.lookup_probes(Label, "name", LABEL_NAMES)
        if want(Badge):
            # get(code=None) raises MultipleObjectsReturned once two rows hold NULL.
            out += self.lookup_probes(Badge, "code", BADGE_CODES)
        if want(Item) or want(Owner) or want(Label):
            item_pks = self.candidates(Item)
            for owner in self.orm(Owner).order_by("pk"):
                for pk in item_pks:
                    out.append(
                        Probe(
                            f"Owner({owner.pk}).set_null_items.get_cached(pk={pk!r})",
                            lambda o=owner, p=pk: o.set_null_items.get_cached(pk=p),
                            lambda o=owner, p=pk: o.set_null_items.get(pk=p),
                        )
                    )
            for label in self.orm(Label).order_by("pk"):
                for pk in item_pks:
                    out.append(
                        Probe(
                            f"Label({label.pk}).items.get_cached(pk={pk!r})",
                            lambda lb=label, p=pk: lb.items.get_cached(pk=p),
                            lambda lb=label, p=pk: lb.items.get(pk=p),
                        )
                    )
        return out

    def lookup_probes(
        self, model: type[models.Model], field: str, values: Iterable[Any]
    ) -> list[Probe]:
        """get_cached(field=value) against the ORM's get(), for each value."""
        return [
            Probe(
                f"{model.__name__}.get_cached({field}={value!r})",
                lambda v=value: self.mgr(model).get_cached(**{field: v}),
                lambda v=value: self.mgr(model).get(**{field: v}),
            )
            for value in values
        ]

    def check(
        self, where: str, models_only: Iterable[type[models.Model]] | None = None, l2: bool = True
    ) -> None:
        probes = self.probes(models_only)
        expected = []
        for p in probes:
            first = outcome(p.cached)
            second = outcome(p.cached)  # an L1 hit, if the first read filled L1
            want = outcome(p.orm)
            expected.append(want)
            assert first == want and second == want, (
                f"{where}: {p.what}\n  get_cached (1st): {first!r}\n"
                f"  get_cached (2nd): {second!r}\n  ORM:              {want!r}"
            )
        if not l2:
            return
        wait_for_fills()
        tiered_cache.clear_local()
        for p, want in zip(probes, expected, strict=True):
            got = outcome(p.cached)
            assert got == want, (
                f"{where}, after clear_local() (L2 path): {p.what}\n"
                f"  get_cached: {got!r}\n  ORM:        {want!r}"
            )
        type(self).counts["probes"] += 3 * len(probes)

    @invariant()
    def cache_agrees_with_orm(self) -> None:
        self.check("after the step")

    # -- creations (bundles) -------------------------------------------------------------
    @rule(target=tenants, name=tenant_names)
    def create_tenant(self, name: str) -> Any:
        self.step("create_tenant")
        t = guarded(lambda: Tenant.objects.create(name=name))
        if isinstance(t, Exception):
            return multiple()
        self.saw(Tenant, t.pk)
        return t.pk

    @rule(
        target=accounts,
        tenant=tenants,
        email=emails,
        balance=balances,
        data=json_values,
        tags=tag_lists,
        proxy=st.booleans(),
    )
    def create_account(
        self, tenant: int, email: str, balance: int, data: Any, tags: list[str], proxy: bool
    ) -> Any:
        self.step("create_account")
        model = ProxyAccount if proxy else Account
        a = guarded(
            lambda: model.objects.create(
                tenant_id=tenant, email=email, balance=balance, data=data, tags=tags
            )
        )
        if isinstance(a, Exception):
            return multiple()
        self.saw(Account, a.pk)
        return a.pk

    @rule(target=accounts, pk=accounts, tenant=tenants, email=emails)
    def resurrect_account(self, pk: int, tenant: int, email: str) -> Any:
        """Insert a row again under a pk that was deleted (its negative entry must go)."""
        self.step("resurrect_account")
        if Account.objects.filter(pk=pk).exists():
            return multiple()
        a = guarded(lambda: Account.objects.create(pk=pk, tenant_id=tenant, email=email))
        return multiple() if isinstance(a, Exception) else pk

    @rule(target=places, kind=place_kinds, name=names)
    def create_place(self, kind: type[Place], name: str) -> Any:
        self.step("create_place")
        p = kind.objects.create(name=name)
        self.saw(Place, p.pk)
        return p.pk

    @rule(target=owners, name=names)
    def create_owner(self, name: str) -> Any:
        self.step("create_owner")
        o = Owner.objects.create(name=name)
        self.saw(Owner, o.pk)
        return o.pk

    @rule(
        target=items,
        cascade=owners,
        others=st.lists(st.one_of(st.none(), owners), min_size=4, max_size=4),
        name=names,
    )
    def create_item(self, cascade: int, others: list[int | None], name: str) -> Any:
        self.step("create_item")
        kw = dict(
            zip(
                ["owner_set_null_id", "owner_set_default_id", "owner_set_id", "owner_protect_id"],
                others,
                strict=True,
            )
        )
        i = guarded(lambda: Item.objects.create(name=name, owner_cascade_id=cascade, **kw))
        if isinstance(i, Exception):
            return multiple()
        self.saw(Item, i.pk)
        return i.pk

    @rule(
        target=items,
        owner=owners,
        n=st.integers(1, 3),
        roles=st.lists(
            st.sampled_from(["set_null", "set_default", "set", "protect"]), max_size=4, unique=True
        ),
        other=st.one_of(st.none(), owners),
    )
    def create_items_of_owner(self, owner: int, n: int, roles: list[str], other: int | None) -> Any:
        """Items that point at one owner through several foreign keys, the rest at another
        owner (or none): what deleting either owner changes is then interesting."""
        self.step("create_items_of_owner")
        if not Owner.objects.filter(pk=owner).exists() or (
            other is not None and not Owner.objects.filter(pk=other).exists()
        ):
            return multiple()
        made = []
        for i in range(n):
            kw = {f"owner_{r}_id": (owner if (i + len(r)) % 2 == 0 else other) for r in roles}
            made.append(Item.objects.create(name=NAMES[i], owner_cascade_id=owner, **kw).pk)
        self.saw(Item, *made)
        return multiple(*made)

    @rule(
        target=owners,
        n_items=st.integers(1, 4),
        protect=st.booleans(),
        label=st.one_of(st.none(), label_names),
    )
    def create_owner_family(self, n_items: int, protect: bool, label: str | None) -> Any:
        """Two owners and items pointing at them through every kind of foreign key (and
        maybe a label): later deletes, related-manager writes and m2m writes bite."""
        self.step("create_owner_family")
        a, b = Owner.objects.create(name="a"), Owner.objects.create(name="b")
        lb = Label.objects.get_or_create(name=label)[0] if label is not None else None
        made = []
        for i in range(n_items):
            x, y = (a, b) if i % 2 == 0 else (b, a)
            item = Item.objects.create(
                name=NAMES[i % len(NAMES)],
                owner_cascade=x,
                owner_set_null=y,
                owner_set_default=x if i % 3 else y,
                owner_set=y,
                owner_protect=b if protect and i == n_items - 1 else None,
            )
            made.append(item.pk)
            if lb is not None and i % 2 == 0:
                item.tags.add(lb)
        self.saw(Owner, a.pk, b.pk)
        self.saw(Item, *made)
        if lb is not None:
            self.saw(Label, lb.pk)
        return multiple(a.pk, b.pk)

    @rule(target=labels, name=label_names)
    def get_or_create_label(self, name: str) -> Any:
        self.step("get_or_create_label")
        lb, _ = Label.objects.get_or_create(name=name)
        self.saw(Label, lb.pk)
        return lb.pk

    @rule(target=documents, pk=doc_ids, title=names)
    def create_document(self, pk: uuid.UUID, title: str) -> Any:
        self.step("create_document")
        d = guarded(lambda: Document.objects.create(id=pk, title=title))
        self.saw(Document, pk)
        return multiple() if isinstance(d, Exception) else pk

    @rule(code=codes, description=names)
    def get_or_create_code(self, code: str, description: str) -> None:
        self.step("get_or_create_code")
        Code.objects.get_or_create(code=code, defaults={"description": description})
        self.saw(Code, code)

    @rule(target=gadgets, name=names)
    def create_gadget(self, name: str) -> Any:
        self.step("create_gadget")
        g = Gadget.objects.create(name=name)
        self.saw(Gadget, g.pk)
        return g.pk

    @rule(target=badges, codes_=st.lists(badge_codes, min_size=1, max_size=3))
    def create_badges(self, codes_: list[str | None]) -> Any:
        """Badges one by one, each in its own statement: a code taken fails alone, and a
        second NULL is never refused."""
        self.step("create_badges")
        pks = []
        for code in codes_:
            b = guarded(lambda c=code: Badge.objects.create(code=c))
            if not isinstance(b, Exception):
                pks.append(b.pk)
        self.saw(Badge, *pks)
        return multiple(*pks)

    @rule(target=tenants, name=tenant_names)
    def get_or_create_tenant(self, name: str) -> Any:
        self.step("get_or_create_tenant")
        t, _ = Tenant.objects.get_or_create(name=name)
        self.saw(Tenant, t.pk)
        return t.pk

    @rule(target=accounts, email=emails, tenant=tenants, balance=balances)
    def get_or_create_account(self, email: str, tenant: int, balance: int) -> Any:
        self.step("get_or_create_account")
        res = guarded(
            lambda: Account.objects.get_or_create(
                email=email, defaults={"tenant_id": tenant, "balance": balance}
            )
        )
        if isinstance(res, Exception):
            return multiple()
        self.saw(Account, res[0].pk)
        return res[0].pk

    @rule(target=accounts, email=emails, tenant=tenants, balance=balances)
    def update_or_create_account(self, email: str, tenant: int, balance: int) -> Any:
        self.step("update_or_create_account")
        res = guarded(
            lambda: Account.objects.update_or_create(
                email=email, defaults={"tenant_id": tenant, "balance": balance}
            )
        )
        if isinstance(res, Exception):
            return multiple()
        self.saw(Account, res[0].pk)
        return res[0].pk

    @rule(target=labels, name=label_names, new=label_names)
    def update_or_create_label(self, name: str, new: str) -> Any:
        """defaults change the unique lookup field itself."""
        self.step("update_or_create_label")
        res = guarded(lambda: Label.objects.update_or_create(name=name, defaults={"name": new}))
        if isinstance(res, Exception):
            return multiple()
        self.saw(Label, res[0].pk)
        return res[0].pk

    @rule(
        target=accounts,
        tenant=tenants,
        rows=st.lists(
            st.tuples(emails, balances), min_size=1, max_size=3, unique_by=lambda r: r[0]
        ),
        upsert=st.booleans(),
    )
    def bulk_create_accounts(self, tenant: int, rows: list[tuple[str, int]], upsert: bool) -> Any:
        self.step("bulk_create_accounts" + ("_upsert" if upsert else ""))
        objs = [Account(tenant_id=tenant, email=e, balance=b) for e, b in rows]
        if upsert:
            res = guarded(
                lambda: Account.objects.bulk_create(
                    objs,
                    update_conflicts=True,
                    unique_fields=["email"],
                    update_fields=["balance", "tenant"],
                )
            )
        else:
            res = guarded(lambda: Account.objects.bulk_create(objs))
        if isinstance(res, Exception):
            return multiple()
        self.saw(Account, *(o.pk for o in res))
        return multiple(*(o.pk for o in res if o.pk is not None))

    @rule(target=gadgets, n=st.integers(1, 3))
    def bulk_create_gadgets(self, n: int) -> Any:
        self.step("bulk_create_gadgets")
        res = Gadget.objects.bulk_create([Gadget(name=f"bulk{i}") for i in range(n)])
        self.saw(Gadget, *(o.pk for o in res))
        return multiple(*(o.pk for o in res))

    @rule(codes_=st.lists(codes, min_size=1, max_size=3, unique=True), description=names)
    def bulk_create_codes_upsert(self, codes_: list[str], description: str) -> None:
        self.step("bulk_create_codes_upsert")
        Code.objects.bulk_create(
            [Code(code=c, description=description) for c in codes_],
            update_conflicts=True,
            unique_fields=["code"],
            update_fields=["description"],
        )
        self.saw(Code, *codes_)

    # -- writes: the op catalogue (top-level rules and atomic blocks share it) ----------
    def apply(self, op: tuple[Any, ...]) -> None:
        note(f"  op {op!r}")
        type(self).counts["op:" + op[0]] += 1
        getattr(self, "op_" + op[0])(*op[1:])

    def op_account_save(self, pk: int, field: str, value: Any) -> None:
        obj = Account.objects.filter(pk=pk).first()
        if obj is None:
            return
        setattr(obj, field, value)
        guarded(obj.save)

    def op_account_update_fields(self, pk: int, field: str, value: Any) -> None:
        obj = Account.objects.filter(pk=pk).first()
        if obj is None:
            return
        setattr(obj, field, value)
        # Another field changed in memory but not saved: update_fields must win.
        obj.balance = obj.balance if field == "balance" else obj.balance + 100
        guarded(lambda: obj.save(update_fields=[field]))

    def op_proxy_save(self, pk: int, email: str, balance: int) -> None:
        obj = ProxyAccount.objects.filter(pk=pk).first()
        if obj is None:
            return
        obj.email, obj.balance = email, balance
        guarded(obj.save)

    def op_proxy_update(self, pk: int, balance: int) -> None:
        ProxyAccount.objects.filter(pk=pk).update(balance=balance)

    def op_tenant_rename(self, pk: int, name: str) -> None:
        obj = Tenant.objects.filter(pk=pk).first()
        if obj is None:
            return
        obj.name = name
        guarded(obj.save)

    def op_delete(self, model_name: str, pk: Any) -> None:
        model = {m.__name__: m for m in PK_MODELS}[model_name]
        obj = model.objects.filter(pk=pk).first()
        if obj is not None:
            guarded(obj.delete)

    def op_restaurant_delete_keep_parents(self, pk: int) -> None:
        obj = Restaurant.objects.filter(pk=pk).first()
        if obj is not None and not ItalianRestaurant.objects.filter(pk=pk).exists():
            obj.delete(keep_parents=True)

    def op_owner_delete(self, pk: int) -> None:
        obj = Owner.objects.filter(pk=pk).first()
        if obj is not None:
            guarded(obj.delete)  # PROTECT raises ProtectedError: fine

    def op_qs_update_plain(self, threshold: int, balance: int) -> None:
        Account.objects.filter(balance__lte=threshold).update(balance=balance)

    def op_qs_update_f(self, pk: int, delta: int) -> None:
        Account.objects.filter(pk=pk).update(balance=F("balance") + delta)

    def op_qs_update_join(self, tenant_name: str, balance: int) -> None:
        Account.objects.filter(tenant__name=tenant_name).update(balance=balance)

    def op_qs_update_q_join(self, tenant_name: str, email: str, balance: int) -> None:
        Account.objects.filter(Q(tenant__name=tenant_name) | Q(email=email)).update(
            balance=balance, data={"q": balance}
        )

    def op_qs_update_isnull(self, name: str) -> None:
        Item.objects.filter(owner_set_null__name__isnull=True).update(name=name)
        Account.objects.filter(tenant__name__isnull=True).update(balance=99)

    def op_qs_update_annotated(self, at_least: int, delta: int) -> None:
        Account.objects.annotate(n=Count("tenant__accounts")).filter(n__gte=at_least).update(
            balance=F("balance") + delta
        )

    def op_qs_update_email(self, pk: int, email: str) -> None:
        guarded(lambda: Account.objects.filter(pk=pk).update(email=email))

    def op_qs_update_tenant(self, pk: int, tenant: int) -> None:
        guarded(lambda: Account.objects.filter(pk=pk).update(tenant_id=tenant))

    def op_qs_delete_join(self, tenant_name: str) -> None:
        guarded(lambda: Account.objects.filter(tenant__name=tenant_name).delete())

    def op_qs_delete_tenant(self, tenant_name: str) -> None:
        guarded(lambda: Tenant.objects.filter(name=tenant_name).delete())

    def op_qs_delete_items_by_label(self, label_name: str) -> None:
        guarded(lambda: Item.objects.filter(tags__name=label_name).delete())

    def op_qs_delete_places_with_pizza(self) -> None:
        guarded(lambda: Place.objects.filter(restaurant__serves_pizza=True).delete())

    def op_bulk_update(self, changes: list[tuple[int, str, int]]) -> None:
        objs = []
        for pk, email, balance in changes:
            obj = Account.objects.filter(pk=pk).first()
            if obj is not None and obj.pk not in {o.pk for o in objs}:
                obj.email, obj.balance = email, balance
                objs.append(obj)
        if objs:
            guarded(lambda: Account.objects.bulk_update(objs, ["email", "balance"]))

    def op_place_parent_update(self, pk: int, name: str) -> None:
        Place.objects.filter(pk=pk).update(name=name)

    def op_place_parent_save(self, pk: int, name: str) -> None:
        place = Place.objects.filter(pk=pk).first()
        if place is not None:
            place.name = name
            place.address = name * 2
            place.save()

    def op_child_update(self, pk: int, name: str, flag: bool) -> None:
        # Fields of the parent and of the child table in one update() of the child.
        Restaurant.objects.filter(pk=pk).update(name=name, serves_pizza=flag)
        ItalianRestaurant.objects.filter(pk=pk).update(has_oven=flag, address=name)

    def op_child_save(self, pk: int, name: str, flag: bool) -> None:
        r = Restaurant.objects.filter(pk=pk).first()
        if r is not None:
            r.name, r.serves_pizza = name, flag
            r.save()

    def op_owner_fk(self, action: str, owner: int, item_pks: list[int]) -> None:
        o = Owner.objects.filter(pk=owner).first()
        if o is None:
            return
        objs = list(Item.objects.filter(pk__in=item_pks))
        mgr = o.set_null_items
        if action == "add":
            guarded(lambda: mgr.add(*objs))
        elif action == "remove":
            guarded(lambda: mgr.remove(*objs))
        elif action == "set":
            guarded(lambda: mgr.set(objs))
        else:
            mgr.clear()

    def op_label_m2m(self, action: str, label: int, item_pks: list[int]) -> None:
        lb = Label.objects.filter(pk=label).first()
        if lb is None:
            return
        objs = list(Item.objects.filter(pk__in=item_pks))
        if action == "add":
            lb.items.add(*objs)
        elif action == "remove":
            lb.items.remove(*objs)
        elif action == "set":
            lb.items.set(objs)
        elif action == "forward_add":
            for obj in objs:
                obj.tags.add(lb)
        else:
            lb.items.clear()

    def op_raw_sql(self, pk: int, balance: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {Account._meta.db_table} SET balance = %s WHERE id = %s", [balance, pk]
            )
        Account.objects.invalidate(pk)

    def op_raw_sql_seen(self, pk: int, balance: int, form: str) -> None:
        """Raw SQL through Django's cursor and no invalidate(): the statement is seen,
        also where its write does not start it."""
        sql = f"UPDATE {Account._meta.db_table} SET balance = %s WHERE id = %s"
        params: list[Any] | None = [balance, pk]
        if form == "comment":
            sql = "/* fuzz */ -- a tag\n" + sql
        elif form == "explain":
            sql = "EXPLAIN ANALYZE " + sql
        elif form == "after_select":  # several statements: psycopg takes them without params
            sql, params = "SELECT 1; " + sql % (int(balance), int(pk)), None
        elif form == "from_tenant":  # every account of the row's tenant, through the tenant
            a, t = Account._meta.db_table, Tenant._meta.db_table
            sql = (
                f"UPDATE {a} SET balance = %s FROM {t} WHERE {t}.id = {a}.tenant_id AND {t}.id = %s"
            )
            tenant = Account._base_manager.filter(pk=pk).values_list("tenant_id", flat=True)
            params = [balance, tenant.first() or 0]
        elif form == "unspaced":  # no space around quoted names
            sql = f'UPDATE"{Account._meta.db_table}"SET balance = %s WHERE"id"=%s'
        elif form == "or_on_a_line":  # every account of the row's tenant: the OR widens
            tenant = Account._base_manager.filter(pk=pk).values_list("tenant_id", flat=True)
            sql = (
                f"UPDATE {Account._meta.db_table} SET balance = %s\n"
                "WHERE tenant_id = %s\nOR FALSE AND id = %s"
            )
            params = [balance, tenant.first() or 0, pk]
        elif form == "upsert_on_lines":  # an INSERT whose ON CONFLICT updates the row
            a = Account._meta.db_table
            sql = (
                f"INSERT INTO {a} (id, tenant_id, email, balance, data, tags)\n"
                f"SELECT id, tenant_id, email, %s, data, tags FROM {a} WHERE id = %s\n"
                "ON CONFLICT (id) DO UPDATE SET balance = EXCLUDED.balance"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)

    def op_flush(self, model_name: str) -> None:
        model = {m.__name__: m for m in PK_MODELS}[model_name]
        model.objects.flush_cache()

    def op_badge_code(self, pk: int, code: str | None, how: str) -> None:
        """A badge's code set, to None too (save() or a queryset update)."""
        if how == "update":
            guarded(lambda: Badge.objects.filter(pk=pk).update(code=code))
            return
        obj = Badge.objects.filter(pk=pk).first()
        if obj is not None:
            obj.code = code
            guarded(obj.save)

    def op_doc_code_gadget(self, which: str, pk: Any, value: str) -> None:
        model = {"Document": Document, "Code": Code, "Gadget": Gadget}[which]
        field = {"Document": "title", "Code": "description", "Gadget": "name"}[which]
        if value == "update":
            model.objects.filter(pk=pk).update(**{field: "updated"})
            return
        obj = model.objects.filter(pk=pk).first()
        if obj is not None:
            setattr(obj, field, value)
            obj.save(update_fields=[field])

    # -- op strategies over the current rows -----------------------------------------------
    def op_strategy(self) -> st.SearchStrategy[tuple[Any, ...]]:
        acc = pks_of(Account) or [0]
        ten = pks_of(Tenant) or [0]
        places_ = pks_of(Place) or [0]
        owners_ = pks_of(Owner) or [0]
        items_ = pks_of(Item) or [0]
        labels_ = pks_of(Label) or [0]
        a, t, pl = st.sampled_from(acc), st.sampled_from(ten), st.sampled_from(places_)
        it = st.lists(st.sampled_from(items_), max_size=3, unique=True)
        account_field = st.one_of(
            st.tuples(st.just("balance"), balances),
            st.tuples(st.just("email"), emails),
            st.tuples(st.just("data"), json_values),
            st.tuples(st.just("tags"), tag_lists),
            st.tuples(st.just("tenant_id"), t),
        )
        return st.one_of(
            st.builds(lambda p, fv: ("account_save", p, *fv), a, account_field),
            st.builds(lambda p, fv: ("account_update_fields", p, *fv), a, account_field),
            st.tuples(st.just("proxy_save"), a, emails, balances),
            st.tuples(st.just("proxy_update"), a, balances),
            st.tuples(st.just("tenant_rename"), t, tenant_names),
            st.tuples(st.just("delete"), st.just("Account"), a),
            st.tuples(st.just("delete"), st.just("Tenant"), t),
            st.tuples(st.just("delete"), st.sampled_from(["Place", "Restaurant"]), pl),
            st.tuples(st.just("owner_delete"), st.sampled_from(owners_)),
            st.tuples(st.just("qs_update_plain"), balances, balances),
            st.tuples(st.just("qs_update_f"), a, balances),
            st.tuples(st.just("qs_update_join"), tenant_names, balances),
            st.tuples(st.just("qs_update_q_join"), tenant_names, emails, balances),
            st.tuples(st.just("qs_update_isnull"), names),
            st.tuples(st.just("qs_update_annotated"), st.integers(1, 3), balances),
            st.tuples(st.just("qs_update_email"), a, emails),
            st.tuples(st.just("qs_delete_join"), tenant_names),
            st.tuples(
                st.just("bulk_update"),
                st.lists(st.tuples(a, emails, balances), min_size=1, max_size=3),
            ),
            st.tuples(st.just("place_parent_update"), pl, names),
            st.tuples(st.just("child_update"), pl, names, st.booleans()),
            st.tuples(
                st.just("owner_fk"),
                st.sampled_from(["add", "remove", "set", "clear"]),
                st.sampled_from(owners_),
                it,
            ),
            st.tuples(
                st.just("label_m2m"),
                st.sampled_from(["add", "remove", "set", "clear"]),
                st.sampled_from(labels_),
                it,
            ),
            st.tuples(st.just("raw_sql"), a, balances),
            st.tuples(st.just("raw_sql_seen"), a, balances, st.sampled_from(RAW_SQL_FORMS)),
            st.tuples(
                st.just("badge_code"),
                st.sampled_from(pks_of(Badge) or [0]),
                badge_codes,
                st.sampled_from(["save", "update"]),
            ),
            st.tuples(st.just("flush"), st.sampled_from(["Account", "Tenant", "Place"])),
        )

    # -- single writes (autocommit) -----------------------------------------------------------
    @rule(
        pk=accounts,
        field=st.sampled_from(["balance", "email", "data", "tags", "tenant_id"]),
        data=st.data(),
    )
    def account_save(self, pk: int, field: str, data: st.DataObject) -> None:
        self.step("account_save")
        value = data.draw(self.field_values(field), label="value")
        self.apply(("account_save", pk, field, value))

    @rule(
        pk=accounts,
        field=st.sampled_from(["balance", "email", "data", "tenant_id"]),
        data=st.data(),
    )
    def account_save_update_fields(self, pk: int, field: str, data: st.DataObject) -> None:
        self.step("account_save_update_fields")
        value = data.draw(self.field_values(field), label="value")
        self.apply(("account_update_fields", pk, field, value))

    def field_values(self, field: str) -> st.SearchStrategy[Any]:
        return {
            "balance": balances,
            "email": emails,
            "data": json_values,
            "tags": tag_lists,
            "tenant_id": st.sampled_from(pks_of(Tenant) or [0]),
        }[field]

    @rule(pk=accounts, email=emails, balance=balances, how=st.sampled_from(["save", "update"]))
    def proxy_write(self, pk: int, email: str, balance: int, how: str) -> None:
        self.step("proxy_write")
        if how == "save":
            self.apply(("proxy_save", pk, email, balance))
        else:
            self.apply(("proxy_update", pk, balance))

    @rule(pk=tenants, name=tenant_names)
    def tenant_rename(self, pk: int, name: str) -> None:
        self.step("tenant_rename")
        self.apply(("tenant_rename", pk, name))

    @rule(pk=accounts)
    def delete_account(self, pk: int) -> None:
        self.step("delete_account")
        self.apply(("delete", "Account", pk))

    @rule(pk=tenants)
    def delete_tenant(self, pk: int) -> None:
        self.step("delete_tenant")
        self.apply(("delete", "Tenant", pk))

    @rule(
        pk=places,
        through=st.sampled_from(["Place", "Restaurant", "ItalianRestaurant", "keep_parents"]),
    )
    def delete_place(self, pk: int, through: str) -> None:
        self.step("delete_place")
        if through == "keep_parents":
            self.apply(("restaurant_delete_keep_parents", pk))
        else:
            self.apply(("delete", through, pk))

    @rule(pk=labels)
    def delete_label(self, pk: int) -> None:
        self.step("delete_label")
        self.apply(("delete", "Label", pk))

    @rule(pk=items)
    def delete_item(self, pk: int) -> None:
        self.step("delete_item")
        self.apply(("delete", "Item", pk))

    @rule(pk=documents)
    def delete_document(self, pk: uuid.UUID) -> None:
        self.step("delete_document")
        self.apply(("delete", "Document", pk))

    @rule(target=shelves, n_books=st.integers(0, 2), n_loans=st.integers(0, 2))
    def create_shelf(self, n_books: int, n_loans: int) -> Any:
        """A shelf, its books with a bookmark each, and loans: foreign keys the database
        acts on when the shelf goes (DB_CASCADE, DB_SET_NULL on Django 6.1)."""
        self.step("create_shelf")
        shelf = Shelf.objects.create(name="s")
        books = [Book.objects.create(shelf=shelf, title=NAMES[i]) for i in range(n_books)]
        marks = [Bookmark.objects.create(book=b, page=i) for i, b in enumerate(books)]
        loans = [Loan.objects.create(shelf=shelf, who=NAMES[i]) for i in range(n_loans)]
        self.saw(Book, *(b.pk for b in books))
        self.saw(Bookmark, *(m.pk for m in marks))
        self.saw(Loan, *(loan.pk for loan in loans))
        return shelf.pk

    @rule(pk=shelves, how=st.sampled_from(["delete", "queryset", "raw_sql"]))
    def delete_shelf(self, pk: int, how: str) -> None:
        self.step("delete_shelf")
        self.apply(("shelf_delete", pk, how))

    def op_shelf_delete(self, pk: int, how: str) -> None:
        if how == "delete":
            for shelf in Shelf.objects.filter(pk=pk):
                shelf.delete()
        elif how == "queryset":
            Shelf.objects.filter(pk=pk).delete()
        elif hasattr(models, "DB_CASCADE"):  # the database carries the delete on
            with connection.cursor() as cursor:
                cursor.execute(f"DELETE FROM {Shelf._meta.db_table} WHERE id = %s", [pk])
        else:  # Django's own on_delete before 6.1: raw SQL must do its part
            Shelf.objects.filter(pk=pk).delete()

    @rule(pk=gadgets)
    def delete_gadget(self, pk: int) -> None:
        self.step("delete_gadget")
        self.apply(("delete", "Gadget", pk))

    @rule(pk=badges)
    def delete_badge(self, pk: int) -> None:
        self.step("delete_badge")
        self.apply(("delete", "Badge", pk))

    @rule(pk=badges, code=badge_codes, how=st.sampled_from(["save", "update"]))
    def write_badge(self, pk: int, code: str | None, how: str) -> None:
        self.step("write_badge")
        self.apply(("badge_code", pk, code, how))

    @rule(code=codes)
    def delete_code(self, code: str) -> None:
        self.step("delete_code")
        self.apply(("delete", "Code", code))

    @rule(pk=documents, value=st.sampled_from(["x", "y", "update"]))
    def write_document(self, pk: uuid.UUID, value: str) -> None:
        self.step("write_document")
        self.apply(("doc_code_gadget", "Document", pk, value))

    @rule(pk=codes, value=st.sampled_from(["x", "y", "update"]))
    def write_code(self, pk: str, value: str) -> None:
        self.step("write_code")
        self.apply(("doc_code_gadget", "Code", pk, value))

    @rule(pk=gadgets, value=st.sampled_from(["x", "y", "update"]))
    def write_gadget(self, pk: int, value: str) -> None:
        self.step("write_gadget")
        self.apply(("doc_code_gadget", "Gadget", pk, value))

    @rule(pk=owners)
    def delete_owner(self, pk: int) -> None:
        self.step("delete_owner")
        self.apply(("owner_delete", pk))

    @rule(name=names)
    def delete_owners_by_name(self, name: str) -> None:
        self.step("delete_owners_by_name")
        guarded(lambda: Owner.objects.filter(name=name).delete())

    @rule(threshold=balances, balance=balances)
    def qs_update_plain(self, threshold: int, balance: int) -> None:
        self.step("qs_update_plain")
        self.apply(("qs_update_plain", threshold, balance))

    @rule(pk=accounts, delta=balances)
    def qs_update_f(self, pk: int, delta: int) -> None:
        self.step("qs_update_f")
        self.apply(("qs_update_f", pk, delta))

    @rule(tenant_name=tenant_names, balance=balances)
    def qs_update_join(self, tenant_name: str, balance: int) -> None:
        self.step("qs_update_join")
        self.apply(("qs_update_join", tenant_name, balance))

    @rule(tenant_name=tenant_names, email=emails, balance=balances)
    def qs_update_q_join(self, tenant_name: str, email: str, balance: int) -> None:
        self.step("qs_update_q_join")
        self.apply(("qs_update_q_join", tenant_name, email, balance))

    @rule(name=names)
    def qs_update_isnull(self, name: str) -> None:
        self.step("qs_update_isnull")
        self.apply(("qs_update_isnull", name))

    @rule(at_least=st.integers(1, 3), delta=balances)
    def qs_update_annotated(self, at_least: int, delta: int) -> None:
        self.step("qs_update_annotated")
        self.apply(("qs_update_annotated", at_least, delta))

    @rule(pk=accounts, email=emails)
    def qs_update_email(self, pk: int, email: str) -> None:
        self.step("qs_update_email")
        self.apply(("qs_update_email", pk, email))

    @rule(pk=accounts, tenant=tenants)
    def qs_update_tenant(self, pk: int, tenant: int) -> None:
        self.step("qs_update_tenant")
        self.apply(("qs_update_tenant", pk, tenant))

    @rule(
        tenant_name=tenant_names,
        what=st.sampled_from(["accounts", "tenant", "items_by_label", "places_with_pizza"]),
        label_name=label_names,
    )
    def qs_delete(self, tenant_name: str, what: str, label_name: str) -> None:
        self.step("qs_delete_" + what)
        if what == "accounts":
            self.apply(("qs_delete_join", tenant_name))
        elif what == "tenant":
            self.apply(("qs_delete_tenant", tenant_name))
        elif what == "items_by_label":
            self.apply(("qs_delete_items_by_label", label_name))
        else:
            self.apply(("qs_delete_places_with_pizza",))

    @rule(changes=st.lists(st.tuples(accounts, emails, balances), min_size=1, max_size=3))
    def bulk_update(self, changes: list[tuple[int, str, int]]) -> None:
        self.step("bulk_update")
        self.apply(("bulk_update", changes))

    @rule(pk=places, name=names, how=st.sampled_from(["update", "save"]))
    def place_parent_write(self, pk: int, name: str, how: str) -> None:
        self.step("place_parent_write")
        self.apply(("place_parent_update" if how == "update" else "place_parent_save", pk, name))

    @rule(pk=places, name=names, flag=st.booleans(), how=st.sampled_from(["update", "save"]))
    def child_write(self, pk: int, name: str, flag: bool, how: str) -> None:
        self.step("child_write")
        self.apply(("child_update" if how == "update" else "child_save", pk, name, flag))

    @rule(action=st.sampled_from(["add", "remove", "set", "clear"]), data=st.data())
    def owner_set_null_items(self, action: str, data: st.DataObject) -> None:
        self.step("owner_set_null_items_" + action)
        owners_, items_ = pks_of(Owner), pks_of(Item)
        if not owners_:
            return
        owner = data.draw(st.sampled_from(owners_), label="owner")
        item_pks = data.draw(
            st.lists(st.sampled_from(items_), max_size=3, unique=True) if items_ else st.just([]),
            label="items",
        )
        self.apply(("owner_fk", action, owner, item_pks))

    @rule(action=st.sampled_from(["add", "remove", "set", "clear", "forward_add"]), data=st.data())
    def label_items(self, action: str, data: st.DataObject) -> None:
        self.step("label_items_" + action)
        labels_, items_ = pks_of(Label), pks_of(Item)
        if not labels_:
            return
        label = data.draw(st.sampled_from(labels_), label="label")
        item_pks = data.draw(
            st.lists(st.sampled_from(items_), max_size=3, unique=True) if items_ else st.just([]),
            label="items",
        )
        self.apply(("label_m2m", action, label, item_pks))

    @rule(pk=accounts, balance=balances)
    def raw_sql_then_invalidate(self, pk: int, balance: int) -> None:
        self.step("raw_sql_then_invalidate")
        self.apply(("raw_sql", pk, balance))

    @rule(pk=accounts, balance=balances, form=st.sampled_from(RAW_SQL_FORMS))
    def raw_sql_seen(self, pk: int, balance: int, form: str) -> None:
        self.step(f"raw_sql_seen_{form}")
        self.apply(("raw_sql_seen", pk, balance, form))

    @rule(
        pk=accounts,
        balance=balances,
        form=st.sampled_from(RAW_SQL_FORMS),
        end=st.sampled_from(["COMMIT", "END", "ROLLBACK", "ABORT"]),
        level=st.sampled_from(
            ["", " ISOLATION LEVEL REPEATABLE READ", " ISOLATION LEVEL SERIALIZABLE"]
        ),
        thread_probe=st.booleans(),
    )
    def sql_transaction(
        self, pk: int, balance: int, form: str, end: str, level: str, thread_probe: bool
    ) -> None:
        """BEGIN ... COMMIT or ROLLBACK run as SQL in autocommit, a transaction Django does
        not know of: nothing uncommitted reaches a tier, and its end applies or drops its
        invalidations. Only writes that open no atomic() of Django's inside it (psycopg
        refuses to leave autocommit inside a transaction it did not open)."""
        self.step(f"sql_transaction_{end.lower()}{'_snapshot' if level else ''}")
        with connection.cursor() as cursor:
            cursor.execute("BEGIN" + level)
            try:
                self.apply(("account_save", pk, "balance", balance))
                self.apply(("raw_sql_seen", pk, balance + 1, form))
                self.check("inside a transaction begun in SQL", l2=False)
                if thread_probe:
                    self.check_in_thread("another thread, while the SQL transaction is open")
            finally:
                cursor.execute(end)
        self.check(f"after the SQL transaction's {end}")

    @rule(
        pk=accounts,
        balance=balances,
        how=st.sampled_from(["block", "block_rollback", "commit", "rollback", "commit_sql"]),
        thread_probe=st.booleans(),
    )
    def driver_transaction(self, pk: int, balance: int, how: str, thread_probe: bool) -> None:
        """A transaction psycopg ends itself on Django's connection, which Django does not
        see end: its transaction() block (committed, or rolled back), or, with Django's
        autocommit off, its commit(), rollback() or a COMMIT run on the raw connection."""
        import psycopg

        self.step(f"driver_transaction_{how}")
        connection.ensure_connection()
        raw = connection.connection
        if how.startswith("block"):
            with raw.transaction():
                self.apply(("account_save", pk, "balance", balance))
                self.check("inside psycopg's transaction() block", l2=False)
                if thread_probe:
                    self.check_in_thread("another thread, while the driver's block is open")
                if how == "block_rollback":
                    raise psycopg.Rollback()
        else:
            transaction.set_autocommit(False)
            try:
                self.apply(("account_save", pk, "balance", balance))
                if thread_probe:
                    self.check_in_thread("another thread, before the driver's end")
                if how == "commit":
                    raw.commit()
                elif how == "rollback":
                    raw.rollback()
                else:
                    raw.execute("COMMIT")
                # A COMMIT run on the raw connection is seen at this connection's next
                # statement (README, Write paths): not yet by another thread here.
                if thread_probe and how != "commit_sql":
                    self.check_in_thread(f"another thread, after the driver's {how}")
                # The probe's queries in this thread began the next transaction, which must
                # end before autocommit comes back (as in plain Django).
                transaction.commit()
            finally:
                if raw.info.transaction_status != 0:  # a failed step: leave no transaction
                    transaction.rollback()
                transaction.set_autocommit(True)
        self.check(f"after the driver's {how}")

    @rule(model=st.sampled_from(["Account", "Tenant", "Place", "Item", "Code"]))
    def flush_cache(self, model: str) -> None:
        self.step("flush_cache")
        self.apply(("flush", model))

    # -- transactions ----------------------------------------------------------------------
    @rule(
        data=st.data(),
        commit=st.booleans(),
        nested=st.sampled_from([None, "commit", "rollback"]),
        thread_probe=st.booleans(),
    )
    def atomic_block(
        self, data: st.DataObject, commit: bool, nested: str | None, thread_probe: bool
    ) -> None:
        self.step(f"atomic_block_{'commit' if commit else 'rollback'}_{nested}")
        ops = data.draw(st.lists(self.op_strategy(), min_size=1, max_size=3), label="ops")
        inner = data.draw(self.op_strategy(), label="savepoint op") if nested else None
        try:
            with transaction.atomic():
                for op in ops:
                    self.apply(op)
                # Inside the block: reads see the block's own writes.
                self.check("inside atomic() after its writes", l2=False)
                if thread_probe:
                    self.check_in_thread("another thread, while the block is open")
                if inner is not None:
                    try:
                        with transaction.atomic():
                            self.apply(inner)
                            self.check("inside a savepoint after its write", l2=False)
                            if nested == "rollback":
                                raise Rollback
                    except Rollback:
                        pass
                    self.check(f"inside atomic() after the savepoint ({nested})", l2=False)
                if not commit:
                    raise Rollback
        except Rollback:
            pass
        if thread_probe:
            self.check_in_thread("another thread, after the block")

    @rule(data=st.data(), pk=accounts, boom=st.booleans(), lookup=st.sampled_from(["pk", "email"]))
    def on_commit_reads(self, data: st.DataObject, pk: int, boom: bool, lookup: str) -> None:
        """An on_commit callback registered before the block's writes reads through the
        cache: it runs after the commit, so it must read the committed row."""
        self.step("on_commit_reads" + ("_raises" if boom else ""))
        ops = data.draw(st.lists(self.op_strategy(), min_size=1, max_size=2), label="ops")
        obj = Account.objects.filter(pk=pk).first()
        key = {"pk": pk} if lookup == "pk" or obj is None else {"email": obj.email}
        recorded: list[Any] = []

        def callback() -> None:
            recorded.append(outcome(lambda: self.mgr(Account).get_cached(**key)))
            recorded.append(
                outcome(lambda: tenant_summary(obj.tenant_id, self.READ_ALIAS))
                if obj is not None
                else None
            )
            if boom:
                raise CallbackBoom

        raised = False
        try:
            with transaction.atomic():
                transaction.on_commit(callback)
                if obj is not None:
                    self.apply(("account_save", pk, "balance", obj.balance + 1))
                for op in ops:
                    self.apply(op)
        except CallbackBoom:
            raised = True
        assert raised == boom
        assert len(recorded) == 2, "the on_commit callback did not run"
        want = outcome(lambda: self.mgr(Account).get(**key))
        assert recorded[0] == want, (
            f"on_commit callback read Account.get_cached({key!r}) = {recorded[0]!r}, "
            f"but the committed row is {want!r}"
        )
        if obj is not None:
            want_fn = outcome(lambda: tenant_summary.fn(obj.tenant_id, self.READ_ALIAS))
            assert recorded[1] == want_fn, (
                f"on_commit callback read tenant_summary({obj.tenant_id}) = {recorded[1]!r}, "
                f"but after the commit it is {want_fn!r}"
            )

    # -- threads -------------------------------------------------------------------------
    def check_in_thread(self, where: str) -> None:
        """Account and Tenant reads in a new thread (its own connection, outside any block
        of ours): get_cached there equals the ORM there."""
        pairs = [(m, pk) for m in (Account, Tenant) for pk in self.candidates(m)]

        def run() -> list[str]:
            bad = []
            for model, pk in pairs:
                got = outcome(lambda m=model, p=pk: self.mgr(m).get_cached(pk=p))
                want = outcome(lambda m=model, p=pk: self.mgr(m).get(pk=p))
                if got != want:
                    bad.append(f"{model.__name__} pk={pk!r}: get_cached {got!r}, ORM {want!r}")
            return bad

        bad = in_thread(run)
        assert not bad, f"{where}:\n  " + "\n  ".join(bad)

    @rule(pk=accounts, balance=balances, data=st.data(), in_atomic=st.booleans())
    def write_while_thread_reads(
        self, pk: int, balance: int, data: st.DataObject, in_atomic: bool
    ) -> None:
        """A reader thread hammers get_cached while this thread writes; once the write
        committed, this thread (and a new one) read the new row."""
        self.step("write_while_thread_reads")
        op = data.draw(
            st.one_of(st.just(("account_save", pk, "balance", balance)), self.op_strategy()),
            label="op",
        )
        stop = threading.Event()
        errors: list[str] = []
        obj = Account.objects.filter(pk=pk).first()
        email = obj.email if obj is not None else EMAILS[0]
        mgr = self.mgr(Account)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for read in (
                        lambda: mgr.get_cached(pk=pk),
                        lambda: mgr.get_cached(email=email),
                    ):
                        try:
                            read()
                        except ObjectDoesNotExist:
                            pass
            except BaseException:
                errors.append(traceback.format_exc())
            finally:
                connections.close_all()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            time.sleep(0.002)
            if in_atomic:
                with transaction.atomic():
                    self.apply(op)
                    time.sleep(0.002)
            else:
                self.apply(op)
            # Committed: this thread reads the new row at once.
            for probe in (
                Probe("Account pk", lambda: mgr.get_cached(pk=pk), lambda: mgr.get(pk=pk)),
                Probe(
                    "Account email",
                    lambda: mgr.get_cached(email=email),
                    lambda: mgr.get(email=email),
                ),
            ):
                got, want = outcome(probe.cached), outcome(probe.orm)
                assert got == want, (
                    f"after the commit, with a reader thread running: {probe.what}\n"
                    f"  get_cached: {got!r}\n  ORM:        {want!r}"
                )
            time.sleep(0.002)
        finally:
            stop.set()
            t.join(30)
        assert not t.is_alive(), "the reader thread did not stop"
        assert not errors, "the reader thread failed:\n" + "\n".join(errors)
        self.check_in_thread("a new thread, after the write and the reader")

    # -- a second process ----------------------------------------------------------------
    @rule(data=st.data(), pk=st.one_of(accounts, tenants))
    def other_process_reads(self, data: st.DataObject, pk: int) -> None:
        """A spawned process reads rows through get_cached (filling its L1), this process
        writes and commits; the other process then serves the new rows (within 2 s)."""
        self.step("other_process_reads")
        op = data.draw(self.op_strategy(), label="op")
        w = get_worker()
        alias = self.READ_ALIAS
        targets = [
            ("testapp.Account", {"pk": pk}),
            ("testapp.Tenant", {"pk": pk}),
            ("testapp.Account", {"email": EMAILS[0]}),
        ]
        for label, lookup in targets:
            w.call("tests.fuzz_machine.child_read", label, alias, lookup)
        self.apply(op)
        for label, lookup in targets:
            model = {"testapp.Account": Account, "testapp.Tenant": Tenant}[label]
            want = outcome(lambda m=model, lk=lookup: self.mgr(m).get(**lk))
            deadline = time.monotonic() + 2.0
            while True:
                got = w.call("tests.fuzz_machine.child_read", label, alias, lookup)
                if got == want or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert got == want, (
                f"another process, 2 s after the commit of {op!r}: {label}.get_cached"
                f"({lookup!r})\n  there: {got!r}\n  ORM:   {want!r}"
            )


class ReadCommittedMachine(CacheMachine):
    READ_ALIAS = "default"


class RepeatableReadMachine(CacheMachine):
    """Reads (cached and oracle) through the "snapshot" alias: the same database in
    REPEATABLE READ. Writes go through the default alias."""

    READ_ALIAS = "snapshot"

    @precondition(lambda self: "snapshot" in settings.DATABASES)
    @rule(data=st.data())
    def snapshot_block(self, data: st.DataObject) -> None:
        """A REPEATABLE READ transaction takes its snapshot, another connection (the
        default alias) commits writes, and reads inside the snapshot still see the
        snapshot, through the cache as through the ORM."""
        self.step("snapshot_block")
        ops = data.draw(st.lists(self.op_strategy(), min_size=1, max_size=2), label="ops")
        with transaction.atomic(using="snapshot"):
            list(Account.objects.using("snapshot").values_list("pk"))  # the snapshot
            for op in ops:
                self.apply(op)
            self.check(
                "inside a REPEATABLE READ block after another connection's commit",
                models_only=[Account, Tenant, Place],
                l2=False,
            )
