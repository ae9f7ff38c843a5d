"""Which models are cached and how: each cached manager's declared lookups, how lookup
values are normalized, its timeouts and its counters (one ModelCache per manager)."""

from __future__ import annotations

import decimal
import hashlib
import ipaddress
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from django.apps import apps
from django.core.exceptions import (
    EmptyResultSet,
    FieldDoesNotExist,
    FullResultSet,
    ImproperlyConfigured,
)
from django.db import DEFAULT_DB_ALIAS, models, router
from django.db.models.expressions import Col, Func, RawSQL
from django.db.models.fields.related_lookups import get_normalized_value
from django.db.models.lookups import Exact
from django.db.models.manager import BaseManager
from django.db.models.query import ModelIterable, QuerySet
from django.db.models.query_utils import check_rel_lookup_compatibility
from django.db.models.sql.where import ExtraWhere, WhereNode

from .conf import conf
from .counters import Counters
from .exceptions import UndeclaredLookup
from .groups import concrete_of, root_label
from .keys import (
    KEY_TYPES,
    Group,
    adapted_otherwise,
    encode_values,
    group,
    int_encodings,
    keyable,
    l1_values,
    lookup_key,
    lookup_keys,
    pk_row_id,
    row_id,
    row_id_of_encoding,
    schema_fingerprint,
    value_field,
)
from .serialization import RowCodec

# Django 6.1+: a queryset's fetch mode says what its instances do on a lazy load. Before,
# every instance fetched one field at a time (FETCH_ONE, the default since).
FETCH_ONE = getattr(models, "FETCH_ONE", None)

__all__ = [
    "CachedManagerBase",
    "Lookup",
    "LookupSpec",
    "ModelCache",
    "UnknownModel",
    "cached_managers",
    "cached_models",
    "checked_lookups",
    "declared_lookups",
    "fetch_mode_of",
    "first_model_cache",
    "instance_value",
    "is_column",
    "is_composite_pk",
    "repeated",
    "model_cache",
    "model_caches",
    "model_caches_of_group",
    "pk_names",
    "reset_registry",
    "resolve_models",
    "uncacheable_reason",
    "djangos_exact",
    "unique_sets",
]

LookupSpec = str | Sequence[str]


class CachedManagerBase:
    """What a cached manager declares. managers.CachedManagerMixin builds the read API on
    it; the registry knows a cached manager by this class."""

    cache_lookups: Sequence[LookupSpec] = ()
    cache_timeout: float | None = None
    cache_l1_timeout: float | None = None
    cache_negative_timeout: float | None = None

    def get_cache_lookups(self) -> list[LookupSpec]:
        return checked_lookups(self.cache_lookups, "cache_lookups")


def pk_names(model: type[models.Model]) -> set[str]:
    """The keywords that name the primary key: pk, its name and attname, and on a
    multi-table child those of each ancestor's pk it is linked to (a Restaurant's
    `id` is its Place's, equal to its own pk: `Restaurant.objects.get(id=...)`)."""
    f: Any = model._meta.pk
    names = {"pk", f.name, f.attname}
    while f.is_relation and f.remote_field.parent_link:
        f = f.target_field
        names |= {f.name, f.attname}
    return names


def is_column(f: Any) -> bool:
    """Whether a field is a column of the model's table (not a reverse or many-to-many
    relation, nor a generic foreign key): what a cache lookup may name."""
    return bool(f.concrete and not f.many_to_many and not f.one_to_many)


def repeated(names: Sequence[str]) -> str | None:
    """The first name given more than once, if any."""
    return next((n for i, n in enumerate(names) if n in names[:i]), None)


def checked_lookups(value: Any, name: str) -> list[LookupSpec]:
    """A manager's declared lookups, checked: a list of field names or of tuples of them.
    Anything else is refused here, naming it, rather than failing later in a check or a
    read with an error about something else."""
    if isinstance(value, str):  # "email" would be read as the lookups e, m, a, i, l
        raise ImproperlyConfigured(
            f"{name}={value!r} is a string; declare a list of field names or tuples of them; "
            f"did you mean {name}=[{value!r}]?"
        )
    try:
        specs = list(value)
    except TypeError:
        raise ImproperlyConfigured(
            f"{name}={value!r}: declare a list of field names or tuples of them, e.g. "
            "['email', ('tenant', 'session_id')]."
        ) from None
    for spec in specs:
        names = (spec,) if isinstance(spec, str) else spec
        if (
            not isinstance(names, (tuple, list))
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise ImproperlyConfigured(
                f"{name}: {spec!r} is not a field name or a tuple of field names."
            )
    return specs


class UnknownModel(ValueError):
    """A label that names no installed model, or a model without a cached manager."""


@dataclass
class Lookup:
    """One declared lookup: the fields, how values are normalized, and its key prefix."""

    names: tuple[str, ...]
    fields: tuple[models.Field[Any, Any], ...]
    orm_names: tuple[str, ...]
    preps: tuple[Callable[[Any], Any], ...]
    key_prefix: str
    model: type[models.Model] = field(repr=False)
    # Only a unique lookup is cached: a cached row would hide a second match, where
    # .get() raises MultipleObjectsReturned.
    unique: bool = True
    # For a unique lookup, per field the type of a value the ORM takes as given (see
    # _PASS_THROUGH): reads.hit() takes such values without a call. None when a field has
    # no such type, or the lookup is not unique.
    plain_types: tuple[type, ...] | None = None
    # False when a field holds JSON: its values keep their own type (true and 1 are other
    # jsonb values, equal in an L1 key) and compare by jsonb's rules, which keys do not
    # follow. Such a read goes to the database.
    keyed: bool = True

    def normalize(
        self, kwargs: dict[str, Any], aliases: dict[str, str], named: dict[str, Any]
    ) -> tuple[Any, ...]:
        """The values of kwargs (keyed by any accepted name) in this lookup's field order,
        as the ORM prepares them; `named`: the field each keyword names."""
        by_name = {aliases[k]: (k, v) for k, v in kwargs.items()}
        out = []
        for name, prep in zip(self.names, self.preps, strict=False):
            keyword, value = by_name[name]
            if isinstance(value, models.Model):
                value = instance_value(named[keyword], value)
            out.append(prep(value))
        return tuple(out)

    def key(self, g: Group, schema: str, alias: str, values: tuple[Any, ...]) -> str:
        """The L2 key of these values read through `alias` (and the manager's filter)."""
        return lookup_key(g, schema, self.key_prefix, alias, values)

    def l1_key(self, db: str, scope: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """The L1 key of these values read through `db` and the manager's filter `scope`
        (reads.hit() builds the same for values l1_values() keeps as they are)."""
        return (self.key_prefix, db, scope, *l1_values(values))

    def orm_kwargs(self, values: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(self.orm_names, values, strict=False))


def instance_value(f: models.Field[Any, Any], value: models.Model) -> Any:
    """A model instance given as the value of an exact lookup on f, as the ORM takes it,
    with its checks and errors: for a relation, the instance's value of the related field
    (an ancestor's or descendant's instance too, as Query.check_related_objects() allows);
    for any other field the instance itself, which the field's get_prep_value() converts
    (a CharField: its str()) or refuses (a number: TypeError), as the ORM's does."""
    if not f.is_relation:
        return value
    # django-stubs: a relation's related_model may be "self" (resolved by now).
    opts = f.related_model._meta  # type: ignore[union-attr]
    if not check_rel_lookup_compatibility(value._meta.model, opts, f):  # type: ignore[arg-type]
        raise ValueError(f'Cannot query "{value}": Must be "{opts.object_name}" instance.')
    return get_normalized_value(value, _Side(f))[0]


class _Side:
    """The left-hand side get_normalized_value() reads: the field a lookup compares."""

    __slots__ = ("output_field",)

    def __init__(self, f: models.Field[Any, Any]) -> None:
        self.output_field = f


# Fields whose get_prep_value returns a value of this exact type unchanged: the hot path
# skips the call for them. Only Django's own classes: a subclass may convert differently.
_PASS_THROUGH: dict[type[models.Field[Any, Any]], type] = {
    models.AutoField: int,
    models.BigAutoField: int,
    models.SmallAutoField: int,
    models.IntegerField: int,
    models.BigIntegerField: int,
    models.SmallIntegerField: int,
    models.PositiveIntegerField: int,
    models.PositiveBigIntegerField: int,
    models.PositiveSmallIntegerField: int,
    models.CharField: str,
    models.EmailField: str,
    models.SlugField: str,
    models.TextField: str,
}


def _target(f: models.Field[Any, Any]) -> models.Field[Any, Any]:
    """The field whose values an exact lookup on f compares (a relation's to_field; a
    GeneratedField's output field, which the ORM prepares the value with: its column is
    read as one)."""
    target = f.target_field if f.is_relation else f  # type: ignore[attr-defined]  # as above
    if isinstance(target, models.GeneratedField) and target.output_field is not None:
        return target.output_field
    return target


def _plain_types(fields: tuple[models.Field[Any, Any], ...]) -> tuple[type, ...] | None:
    types = tuple(_PASS_THROUGH.get(type(_target(f))) for f in fields)
    return None if None in types else types  # type: ignore[return-value]  # no None left


def _prep_for(f: models.Field[Any, Any]) -> Callable[[Any], Any]:
    """The conversion the ORM applies to an exact lookup's value, errors included, to the
    type the tiers key it by (keys.keyable). An expression (F(), Value(), a queryset) is
    left for the ORM to resolve: get() reads the database for it (keys.KEY_TYPES)."""
    target = _target(f)
    prep = target.get_prep_value

    def slow(value: Any) -> Any:
        if hasattr(value, "resolve_expression"):
            return value
        prepared = prep(value)
        return prepared if adapted_otherwise(prepared) else keyable(prepared)

    same = _PASS_THROUGH.get(type(target))
    if same is None:
        return slow

    def fast(value: Any) -> Any:
        return value if type(value) is same else slow(value)

    return fast


class ModelCache:
    """Everything tiered_cache knows about one cached manager of one model."""

    def __init__(
        self,
        model: type[models.Model],
        manager_name: str,
        lookups: Iterable[LookupSpec],
        timeout: float | None = None,
        l1_timeout: float | None = None,
        negative_timeout: float | None = None,
    ):
        opts = model._meta
        if is_composite_pk(model):
            raise ImproperlyConfigured(
                f"{opts.label_lower}: tiered_cache does not cache models with a composite "
                "primary key (CompositePrimaryKey); use a plain manager for this model."
            )
        self.model = model
        self.label = opts.label_lower
        self.root = root_label(model)
        self.manager_name = manager_name
        # Every entry of this manager's lookups starts with it (after tag and schema).
        self.key_prefix = f"{self.label}:{manager_name}:"
        self._timeout = timeout
        self._l1_timeout = l1_timeout
        self._negative_timeout = negative_timeout
        self.codec = RowCodec(model)
        self.schema = schema_fingerprint(model)
        # Whether the manager overrides get_queryset(): its filter is then part of the key,
        # read at every call (see scope()).
        self.custom_queryset = False
        # Whether .get() through it runs the project's own get() (own_get()): every read
        # then goes to the database through it.
        self.own_get = False
        # Whether it overrides the db property, which then picks the database each read is
        # keyed by, or cache_group()/cache_group_alias(), which pick the group a read is
        # invalidated with (reads.hit() leaves such reads to get(), which asks them).
        self.custom_db = False

        uniques = unique_sets(model)
        declared: list[tuple[str, ...]] = [("pk",)]
        for spec in lookups:
            names = (spec,) if isinstance(spec, str) else tuple(spec)
            if not names:
                raise ImproperlyConfigured(f"{self.label}: an empty cache lookup was declared")
            names = tuple(self._declared_name(n) for n in names)
            twice = repeated(names)
            if twice is not None:  # ("pk", "id"): no call could give both keywords
                raise ImproperlyConfigured(
                    f"{self.label}: cache lookup {spec!r} names field {twice!r} twice"
                )
            if names not in declared:
                declared.append(names)
        self.declared = declared

        # Every kwarg name a caller may use, mapped to the declared field name, and to the
        # field it names (which decides how a model instance given for it is taken).
        pk_names = self._pk_names()
        self.aliases: dict[str, str] = dict.fromkeys(pk_names, "pk")
        self.named: dict[str, models.Field[Any, Any]] = {
            n: opts.pk if n == "pk" else opts.get_field(n)  # type: ignore[misc]
            for n in pk_names
        }
        self.lookups: dict[frozenset[str], Lookup] = {}
        self.single: dict[str, Lookup] = {}
        # reads.hit()'s view of `single`: per kwarg name of a unique one-field lookup whose
        # field has a plain type (Lookup.plain_types), its L1 key prefix, that type and
        # the lookup.
        self.plain_single: dict[str, tuple[str, type, Lookup]] = {}
        for names in declared:
            fields = tuple(self._field(n) for n in names)
            orm_names = tuple(
                "pk" if n == "pk" else f.attname for n, f in zip(names, fields, strict=False)
            )
            unique = (
                names == ("pk",) or any(u <= {f.name for f in fields} for u in uniques)
            ) and all(djangos_exact(f) for f in fields)
            lk = Lookup(
                names=names,
                fields=fields,
                orm_names=orm_names,
                preps=tuple(_prep_for(f) for f in fields),
                key_prefix=f"{self.key_prefix}{'+'.join(names)}:",
                model=model,
                unique=unique,
                plain_types=_plain_types(fields) if unique else None,
                keyed=not any(isinstance(_target(f), models.JSONField) for f in fields),
            )
            alias_sets = []
            for n, f in zip(names, fields, strict=False):
                if n == "pk":
                    accepted = pk_names
                else:
                    accepted = {n, f.name, f.attname}
                    for a in accepted:
                        self.aliases[a] = n
                        self.named[a] = f
                alias_sets.append(sorted(accepted))
            for combo in itertools.product(*alias_sets):
                self.lookups[frozenset(combo)] = lk
                if len(combo) == 1:
                    self.single[combo[0]] = lk
                    if lk.plain_types is not None:
                        self.plain_single[combo[0]] = (lk.key_prefix, lk.plain_types[0], lk)
        self.pk_lookup = self.lookups[frozenset({"pk"})]
        # The type of a pk value that pk_row_id() would hand to row_id() unchanged (see
        # _PASS_THROUGH; a multi-table child's pk is its ancestor's): every read past L1
        # and each row of get_many_cached() names its row, and the two calls cost more
        # than the id.
        self._pk_plain: type | None = _PASS_THROUGH.get(type(value_field(model._meta.pk)))
        # Per keyword order: the lookup, which keyword each of its fields is, and for
        # plain_many() the same as an itemgetter (None: the keywords are in its order).
        self._orders: dict[
            tuple[str, ...], tuple[Lookup, tuple[int, ...], Callable[[Any], Any] | None]
        ] = {}
        self.counters = Counters()

    def _pk_names(self) -> set[str]:
        return pk_names(self.model)

    def _declared_name(self, name: str) -> str:
        """One name per field whichever way it was declared: "pk" for the primary key,
        else the field's name (a foreign key declared by its attname too), so that no
        keyword maps to two names when lookups spell a field differently."""
        f = self._field(name)
        return "pk" if f is self.model._meta.pk or name in pk_names(self.model) else f.name

    def _field(self, name: str) -> models.Field[Any, Any]:
        if name == "pk":
            return self.model._meta.pk
        try:
            f = self.model._meta.get_field(name)
        except FieldDoesNotExist:
            raise ImproperlyConfigured(
                f"{self.label}: cache lookup names unknown field {name!r}"
            ) from None
        # Check E007 says so at startup; this is for a process that skipped the checks.
        if not is_column(f):
            raise ImproperlyConfigured(
                f"{self.label}: cache lookup {name!r} must name a concrete field, not a "
                "reverse or many-to-many relation"
            )
        return f  # type: ignore[return-value]

    # -- timeouts, read live so override_settings applies ----------------------
    @property
    def timeout(self) -> float:
        return self._timeout if self._timeout is not None else conf.TIMEOUT

    @property
    def l1_timeout(self) -> float:
        return self._l1_timeout if self._l1_timeout is not None else conf.L1_TIMEOUT

    @property
    def negative_timeout(self) -> float:
        if self._negative_timeout is not None:
            return self._negative_timeout
        return conf.NEGATIVE_TIMEOUT

    # -- lookups -----------------------------------------------------------------
    def resolve(self, kwargs: dict[str, Any]) -> tuple[Lookup, tuple[Any, ...]]:
        """The declared lookup for these kwargs and their ORM-normalized values."""
        if len(kwargs) == 1:
            ((name, value),) = kwargs.items()
            lk = self.single.get(name)
            if lk is not None:
                if isinstance(value, models.Model):
                    value = instance_value(self.named[name], value)
                return lk, (lk.preps[0](value),)
        else:
            # Callers use the same keyword order every time: remember, per order, which
            # declared field each position is, and skip building a dict and a frozenset.
            names = tuple(kwargs)
            known = self._orders.get(names)
            if known is not None:
                lk, order, _ = known
                given = tuple(kwargs.values())
                out: list[Any] = []
                for i, prep in zip(order, lk.preps, strict=False):
                    value = given[i]
                    if isinstance(value, models.Model):
                        value = instance_value(self.named[names[i]], value)
                    out.append(prep(value))
                return lk, tuple(out)
            lk = self.lookups.get(frozenset(kwargs))
            if lk is not None and len(kwargs) == len(lk.names):
                values = lk.normalize(kwargs, self.aliases, self.named)
                canonical = [self.aliases[n] for n in names]
                order = tuple(canonical.index(n) for n in lk.names)
                in_order = order == tuple(range(len(order)))
                self._orders[names] = (lk, order, None if in_order else itemgetter(*order))
                return lk, values
        plain = self._plainly_spelled(kwargs)
        if plain is not None:
            try:
                return self.resolve(plain)
            except UndeclaredLookup:
                pass  # named as the caller spelled it, below
        raise UndeclaredLookup(self.label, kwargs, self.declared, self._why_not(kwargs))

    def _plainly_spelled(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """kwargs as `field=value`, where .get() takes them as that (see _plain_name).
        None when none is so spelled, or when two keywords name one field (the ORM would
        AND them; such a read is refused)."""
        out: dict[str, Any] = {}
        for name, value in kwargs.items():
            plain = self._plain_name(name)
            if plain is None or plain[0] in out:
                return None
            field_name, through = plain
            if through is not None and not through.is_relation and isinstance(value, models.Model):
                # The ORM prepares the value as the field pointed at: an instance there is
                # that field's error (or a CharField's str()), not its pk; unless that field
                # is a relation itself (a multi-table child's parent link), which takes one.
                value = through.get_prep_value(value)
            out[field_name] = value
        return None if list(out) == list(kwargs) else out

    def _plain_name(self, name: str) -> tuple[str, models.Field[Any, Any] | None] | None:
        """The field a keyword names where .get() reads it as `field=value`: `name`,
        `name__exact`, and a forward relation's `rel__<the field it points at>`
        (`tenant__pk`, `tenant__id`), which the ORM reads from the relation's own column;
        with the field pointed at in that last case. None for any other expression."""
        parts = name.split("__")
        if len(parts) > 1 and parts[-1] == "exact":
            parts.pop()
        if len(parts) == 1:
            return parts[0], None
        if len(parts) != 2:
            return None
        try:
            f = self.model._meta.get_field(parts[0])
        except FieldDoesNotExist:
            return None
        if not (f.concrete and (f.many_to_one or f.one_to_one)):
            return None
        target: models.Field[Any, Any] = f.target_field  # type: ignore[union-attr]
        if parts[1] in (target.name, target.attname) or (
            parts[1] == "pk" and target is target.model._meta.pk
        ):
            return parts[0], target
        return None

    def _why_not(self, names: Iterable[str]) -> str | None:
        """Why no lookup could be declared for these keywords, when none could: a
        lookup expression, a name that is no field, a relation that is no column, or
        two keywords for one field."""
        seen: dict[str, str] = {}
        for name in sorted(names):
            plain = self._plain_name(name)
            if plain is None:
                return (
                    "get_cached() takes field=value (or field__exact=value), not other "
                    f"lookup expressions ({name!r})"
                )
            field_name = plain[0]
            if field_name == "pk":
                one = "pk"
            else:
                try:
                    f = self.model._meta.get_field(field_name)
                except FieldDoesNotExist:
                    return f"{self.model._meta.label} has no field {field_name!r}"
                if not is_column(f):
                    return f"{field_name!r} is a reverse or many-to-many relation, not a column"
                one = self._declared_name(field_name)
            if one in seen:
                return f"{seen[one]!r} and {name!r} name one field"
            seen[one] = name
        return None

    def plain_many(self, kwargs: dict[str, Any]) -> tuple[Lookup, tuple[Any, ...]] | None:
        """resolve()'s answer for several fields in an order resolve() has seen before,
        when the lookup is unique and every value is of the type the ORM takes unchanged
        (Lookup.plain_types); None otherwise, and resolve() decides. reads.hit() checks one
        field itself."""
        # On every L1 hit of such a lookup: C-level loops only (a comprehension and a zip
        # loop here cost as much as the L1 entry's lookup).
        known = self._orders.get(tuple(kwargs))
        if known is None:
            return None
        lk, _, pick = known
        values = tuple(kwargs.values()) if pick is None else pick(tuple(kwargs.values()))
        # Never equal when plain_types is None (a lookup whose values the ORM converts).
        if tuple(map(type, values)) != lk.plain_types:
            return None
        return lk, values

    def group(self, alias: str) -> Group:
        return group(alias, self.root)

    def key(self, lk: Lookup, values: tuple[Any, ...], alias: str | None = None) -> str:
        """The L2 key of one lookup's values, read from `alias` (the home database)."""
        g = self.home if alias is None else self.group(alias)
        return lk.key(g, self.schema, alias or g.alias, values)

    @property
    def home(self) -> Group:
        """The group of the database the model is written to (operations, stats)."""
        alias = router.db_for_write(self.model) if router.routers else DEFAULT_DB_ALIAS
        return group(alias, self.root)

    def row_id_of(self, pk: Any) -> str:
        if type(pk) is self._pk_plain:
            return row_id(pk)
        return pk_row_id(self.model._meta.pk, pk)

    def pk_key(self, g: Group, alias_part: str, pk: Any) -> tuple[str, str]:
        """pk_keys() of one pk: its L2 key and its row's id, the pk encoded once for both."""
        encoded = encode_values((pk,))
        key = lookup_key(g, self.schema, self.pk_lookup.key_prefix, alias_part, (pk,), encoded)
        if type(pk) is self._pk_plain:
            return key, row_id_of_encoding(encoded)
        return key, pk_row_id(self.model._meta.pk, pk)

    def pk_keys(self, g: Group, alias_part: str, pks: list[Any]) -> tuple[list[str], list[str]]:
        """The L2 keys of the pk lookup's values `pks` (as its prep gives them) read through
        `alias_part`, and their rows' ids: each pk encoded once for both."""
        ints = int_encodings(pks) if self._pk_plain is int else None
        keys, encoded = lookup_keys(
            g, self.schema, self.pk_lookup.key_prefix, alias_part, pks, ints
        )
        if ints is not None:
            return keys, ints
        plain = self._pk_plain
        rids = [
            row_id_of_encoding(e) if type(pk) is plain else self.row_id_of(pk)
            for pk, e in zip(pks, encoded, strict=True)
        ]
        return keys, rids

    def scope(self, manager: Any) -> str | None:
        """The part of a key that stands for the manager's own filter: "" for a manager that
        keeps Django's get_queryset(). One that overrides it may filter on values known at
        run time (the current tenant): its filter, values included, is part of the key.
        None when reads must go to the database (see _scope_reason)."""
        return self.read_scope(manager)[0]

    def read_scope(self, manager: Any) -> tuple[str | None, Any, str | None]:
        """(scope() of the manager; the fetch mode its queryset gives the instances it
        returns, which a cached instance must get too, or None for Django's default; the
        database its queryset picks itself with using(), or None)."""
        if not self.custom_queryset:
            return "", None, None
        if self.own_get:
            return None, None, None
        qs = manager.get_queryset()
        reason, scope = _scope_of(manager.model, qs)
        if reason is not None:
            return None, None, None
        return scope, fetch_mode_of(qs), qs._db


# The ModelCaches built so far, by (model, manager name); read-only outside model_cache()
# and reset_registry().
built: dict[tuple[type[models.Model], str], ModelCache] = {}
# A model's own managers (the instances of its _meta.managers_map, which `Model.objects`
# returns) by id(), with their ModelCache, or None for one whose reads hit() never serves
# (its own get_queryset() or db): reads.hit() knows such a manager by identity, without a
# call. The entry holds the manager, so its id is not reused while it is here. One entry
# per (model, name): Django builds new instances when a model's _meta caches expire (a
# model registered at runtime, override_settings(INSTALLED_APPS)...), and the newest
# replaces the one before; copies from db_manager() and related managers never get in.
plain_managers: dict[int, tuple[Any, ModelCache | None]] = {}
_plain_ids: dict[tuple[type[models.Model], str], int] = {}
_by_root: dict[str, list[ModelCache]] = {}
_registry_lock = threading.Lock()


def model_cache(manager: Any) -> ModelCache:
    """The ModelCache of a cached manager, built on first use (the model is complete then)."""
    key = (manager.model, manager.name)
    mc = built.get(key)
    if mc is None:
        with _registry_lock:
            mc = built.get(key)
            if mc is None:
                mc = ModelCache(
                    manager.model,
                    manager.name or "objects",
                    manager.get_cache_lookups(),
                    timeout=manager.cache_timeout,
                    l1_timeout=manager.cache_l1_timeout,
                    negative_timeout=manager.cache_negative_timeout,
                )
                # A queryset class with an __init__ of its own (from_queryset()) may set a
                # filter, a database, a fetch mode or an iterable as a get_queryset() does.
                mc.own_get = own_get(manager)
                mc.custom_queryset = (
                    _overrides(manager, "get_queryset")
                    or _defines_own(manager._queryset_class, "__init__", QuerySet)
                    or mc.own_get
                )
                mc.custom_db = any(
                    _overrides(manager, name) for name in ("db", "cache_group", "cache_group_alias")
                )
                built[key] = mc
                _by_root.setdefault(mc.root, []).append(mc)
    return mc


def plain_model_cache(manager: Any) -> ModelCache | None:
    """The ModelCache of a model's own manager that adds no filter, database or hints of
    its own to a read; None for any other manager. A model's own manager is remembered in
    plain_managers, with None if its reads are not plain."""
    if (
        manager._db
        or manager._hints
        or getattr(manager, "core_filters", None) is not None
        or manager.model._meta.managers_map.get(manager.name) is not manager
    ):
        return None
    mc = model_cache(manager)
    plain = None if mc.custom_queryset or mc.custom_db else mc
    key = (manager.model, manager.name)
    with _registry_lock:
        if built.get(key) is mc:  # not reset meanwhile
            before = _plain_ids.get(key)
            if before is not None and before != id(manager):
                plain_managers.pop(before, None)
            _plain_ids[key] = id(manager)
            plain_managers[id(manager)] = (manager, plain)
    return plain


def _overrides(manager: Any, attribute: str) -> bool:
    """Whether the manager's class defines `attribute` itself, over Django's and ours."""
    return _defines_own(type(manager), attribute, BaseManager)


def _defines_own(cls: type, attribute: str, django_base: type) -> bool:
    """Whether cls defines `attribute` itself, over django_base's and ours."""
    for klass in cls.__mro__:
        if attribute in vars(klass):
            return not (klass is django_base or klass.__module__.startswith("tiered_cache."))
    return False


def own_get(manager: Any) -> bool:
    """Whether .get() on the manager runs a get() of the project's, the manager class's or
    its queryset class's, which may filter by what the tiers cannot know (the current
    tenant, a soft delete). Django's managers have a get() that only calls the queryset's
    (made by from_queryset(), wrapping it)."""
    method = getattr(type(manager), "get", None)
    # Django's proxies share one code object (BaseManager._get_queryset_methods); a get()
    # of the project's under a decorator of functools.wraps is not one of them.
    if method is not None and getattr(method, "__code__", None) is not _PROXY_CODE:
        return not method.__module__.startswith("tiered_cache.")
    return _defines_own(manager._queryset_class, "get", QuerySet)


_PROXY_CODE = models.Manager.get.__code__


def uncacheable_reason(manager: Any) -> str | None:
    """Why get_cached() on this manager can never be cached (system check W003), or None."""
    if own_get(manager):
        return "its get() is the project's own (the manager's or its queryset's)"
    try:
        return _scope_of(manager.model, manager.get_queryset())[0]
    except Exception:  # an unusual queryset: be safe
        return "its queryset could not be inspected"


def fetch_mode_of(qs: Any) -> Any:
    """The fetch mode (Django 6.1+) a queryset gives its instances; None for the default."""
    mode = getattr(qs, "_fetch_mode", None)
    return None if mode is FETCH_ONE else mode


def _scope_reason(model: type[models.Model], qs: Any) -> str | None:
    """A queryset that reads other tables (a join or subquery in its filter) has answers
    that writes to those tables change; one that annotates, aggregates, slices or selects
    only some columns returns rows the cache does not hold."""
    query = qs.query
    if query.select_related or qs._prefetch_related_lookups:
        # The ORM's instances come with those objects (and select_related()'s inner join
        # drops a row whose related row is gone); a cached one holds its row only.
        return "its queryset selects or prefetches related objects"
    if qs._iterable_class is not ModelIterable:
        # Its own iterable builds the instances (another class, attributes of its own,
        # as django-polymorphic's does); a cached instance is built from its row alone.
        return "its queryset builds instances with an iterable of its own (_iterable_class)"
    if (
        query.annotations
        or query.extra
        or query.distinct
        or query.is_sliced
        or (query.group_by is not None)
        or query.values_select
        or query.combinator
    ):
        return "its queryset annotates, groups, slices or selects values"
    if query.where and _reads_the_clock(query.where):
        return "its queryset filters on what the database computes when it runs (Now(), RawSQL...)"
    if query.select_for_update:
        # Its reads lock the row (and need a transaction): a cached read would do neither.
        return "its queryset locks rows (select_for_update())"
    if query.deferred_loading[0] or not query.deferred_loading[1]:
        # The cache holds whole rows, and a row read with fields deferred is not one.
        return "its queryset defers fields (defer(), only())"
    # Aliases Django trimmed (a filter on a foreign key column) are left with no refs.
    tables = {t.table_name for a, t in query.alias_map.items() if query.alias_refcount.get(a)}
    own = {m._meta.db_table for m in [concrete_of(model), *model._meta.get_parent_list()]}
    if tables - own or query.extra_tables:
        return "its queryset reads other tables"
    return None


_SUBQUERY = re.compile(r"\bSELECT\b", re.IGNORECASE)


def _scope_of(model: type[models.Model], qs: Any) -> tuple[str | None, str]:
    """(Why reads through this queryset skip the tiers, or None; the key part of its
    filter). The key is a digest of the filter's SQL and parameters as compiled now, for
    the database the read goes to: they hold all that decides which rows match, where
    str(where) leaves out a JSON key's name, a collation, and the time zone that a date
    transform converts to (the active one, taken when the SQL is made)."""
    reason = _scope_reason(model, qs)
    query = qs.query
    if reason is not None or not query.where:
        return reason, ""
    try:
        sql, params = query.get_compiler(qs.db).compile(query.where)
    except EmptyResultSet:
        return "its queryset matches no row", ""  # the database says DoesNotExist at once
    except FullResultSet:
        return None, ""
    if _SUBQUERY.search(sql):
        return "its queryset reads other tables", ""
    texts = [_param_text(p) for p in params]
    if None in texts:
        return "its queryset filters by a value that cannot be keyed", ""
    text = "\0".join([sql, *texts])  # type: ignore[list-item]  # no None left
    return None, hashlib.sha1(text.encode()).hexdigest()[:12]


# Parameter types whose repr() shows the whole value, so that two values give two texts.
_SHOWN = (
    *KEY_TYPES,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)


def _param_text(param: Any) -> str | None:
    """A filter parameter as text that tells values apart, None when none can be made: a
    value's repr(), a JSON value's whole content (psycopg's Json wrappers cut their repr at
    40 characters), lists and tuples of those. Any other object's repr() may show its
    address, which CPython hands to the next object as soon as this one goes: two values
    would give one text."""
    if type(param).__name__ in ("Json", "Jsonb"):
        param = getattr(param, "obj", object())
        return None if not _json_shown(param) else f"json:{param!r}"
    if isinstance(param, list | tuple):
        texts = [_param_text(p) for p in param]
        if None in texts:
            return None
        return f"{type(param).__name__}[" + "\x1f".join(t for t in texts if t) + "]"
    if isinstance(param, _SHOWN):
        return f"{type(param).__name__}:{param!r}"
    return None


def _json_shown(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_shown(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_json_shown(v) for v in value)
    return isinstance(value, type(None) | bool | int | float | str | decimal.Decimal)


def _reads_the_clock(where: Any) -> bool:
    """Whether a filter holds an expression the database evaluates with no column of the
    row in it (Now(), Random(), a function of constants) or raw SQL: its answer for a row
    may change with no write to that row (`expires__gt=Now()` lapses), so a cached answer
    would outlive it. Plain values compared with columns are what scopes are made of."""
    stack: list[Any] = [where]
    while stack:
        node = stack.pop()
        if isinstance(node, RawSQL | ExtraWhere):
            return True  # SQL we do not read: it may name the clock
        children = getattr(node, "children", None)
        if isinstance(node, WhereNode) and children is not None:
            stack.extend(children)
            continue
        sources = getattr(node, "get_source_expressions", None)
        if sources is None:
            continue  # a plain value
        parts = [e for e in sources() if e is not None]
        if isinstance(node, Func) and not any(_has_column(e) for e in parts):
            return True
        stack.extend(parts)
    return False


def _has_column(expr: Any) -> bool:
    if isinstance(expr, Col):
        return True
    sources = getattr(expr, "get_source_expressions", None)
    return sources is not None and any(_has_column(e) for e in sources() if e is not None)


def djangos_exact(f: models.Field[Any, Any]) -> bool:
    """Whether get(f=value) compares with an exact lookup of Django's own. One a project
    registers (f.register_lookup(), a case-insensitive exact, say) may match several rows
    of a unique column, so a lookup through it is not unique."""
    # A GeneratedField's column is read as its output field, whose lookups the ORM takes.
    exact = (_target(f) if isinstance(f, models.GeneratedField) else f).get_lookup("exact")
    # Django's own subclasses of Exact (RelatedExact, JSONExact...) compare for equality;
    # not every Django lookup named "exact" does (full-text search's).
    return (
        exact is not None
        and issubclass(exact, Exact)
        and exact.lookup_name == "exact"
        and exact.__module__.startswith("django.")
    )


def unique_sets(model: type[models.Model]) -> list[set[str]]:
    """Unique field sets, from the concrete model and its parents (a proxy's own Meta
    carries none of them)."""
    concrete = concrete_of(model)
    sets = [{f.name} for f in concrete._meta.concrete_fields if f.unique or f.primary_key]
    for m in [concrete, *concrete._meta.get_parent_list()]:
        opts = m._meta
        sets += [set(t) for t in opts.unique_together]
        for c in opts.constraints:
            if isinstance(c, models.UniqueConstraint) and c.fields and c.condition is None:
                sets.append(set(c.fields))
    return sets


def is_composite_pk(model: type[models.Model]) -> bool:
    pk = model._meta.pk
    return pk is not None and type(pk).__name__ == "CompositePrimaryKey"


def model_caches_of_group(g: Group) -> list[ModelCache]:
    """The built ModelCaches whose rows belong to this group's table hierarchy."""
    return _by_root.get(g.label, [])


def reset_registry() -> None:
    """Forget built ModelCaches (tests that change KEY_PREFIX or SECRET_KEY)."""
    with _registry_lock:
        built.clear()
        plain_managers.clear()
        _plain_ids.clear()
        _by_root.clear()


def cached_managers(model: type[models.Model] | None = None) -> list[Any]:
    """Every cached manager of every installed model (or of one model)."""
    found = []
    for m in [model] if model is not None else apps.get_models():
        for mgr in m._meta.managers:
            if isinstance(mgr, CachedManagerBase):
                found.append(mgr)
    return found


def cached_models() -> list[type[models.Model]]:
    """Models with a cached manager (composite-pk models are refused by a check)."""
    seen: dict[type[models.Model], None] = {}
    for mgr in cached_managers():
        if not is_composite_pk(mgr.model):
            seen.setdefault(mgr.model, None)
    return list(seen)


def model_caches(model: type[models.Model]) -> list[ModelCache]:
    return [model_cache(m) for m in cached_managers(model)]


def first_model_cache(model: type[models.Model]) -> ModelCache | None:
    mgrs = cached_managers(model)
    return model_cache(mgrs[0]) if mgrs else None


def declared_lookups(model: type[models.Model]) -> list[str]:
    """Declared lookups of every cached manager, as "pk", "email", "tenant_id+session_id"."""
    seen: list[str] = []
    for mc in model_caches(model):
        for names in mc.declared:
            text = "+".join(names)
            if text not in seen:
                seen.append(text)
    return seen


def resolve_models(labels: Iterable[str]) -> list[type[models.Model]]:
    """Cached models for "app_label.ModelName" labels (model name case-insensitive)."""
    out: list[type[models.Model]] = []
    for label in labels:
        if not isinstance(label, str):  # a model class: task arguments must be JSON
            raise UnknownModel(
                f"{label!r} is not a model label; name models as app_label.ModelName, "
                "e.g. 'demo.User' (a model's is Model._meta.label)"
            )
        try:
            model = apps.get_model(label)
        except ValueError:
            raise UnknownModel(
                f"{label!r} is not a model label; use app_label.ModelName, e.g. demo.User"
            ) from None
        except LookupError:
            raise UnknownModel(f"{label!r}: no such model is installed") from None
        if not cached_managers(model):
            raise UnknownModel(
                f"{model._meta.label} is not cached (it has no CachedManager); cached models: "
                + ", ".join(m._meta.label for m in cached_models())
            )
        if model not in out:
            out.append(model)
    return out


def _after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
