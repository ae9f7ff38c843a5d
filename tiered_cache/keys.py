"""Injective cache keys: prefix, model, schema fingerprint, manager, lookup and values."""

from __future__ import annotations

import datetime
import decimal
import hashlib
import uuid
from collections.abc import Iterable
from typing import Any

from django.db import models

# Bumped whenever the payload layout changes, so old payloads are never decoded.
FORMAT_VERSION = "1"

# Keys longer than this are hashed; Redis keys are binary-safe but long keys cost memory.
_MAX_PLAIN = 200


def encode_value(value: Any) -> str:
    """A type-tagged text form: 1 and "1" and True never share a form."""
    t = type(value)
    if t is int:
        return "i" + str(value)
    if t is str:
        return "s" + value
    if value is None:
        return "n"
    if t is bool:
        return "b1" if value else "b0"
    if t is uuid.UUID:
        return "u" + value.hex
    if t is decimal.Decimal:
        return "d" + str(value.normalize())
    if t is datetime.datetime:
        return "t" + value.isoformat()
    if t is datetime.date:
        return "D" + value.isoformat()
    if t is float:
        return "f" + repr(value)
    if t is bytes:
        return "x" + value.hex()
    if isinstance(value, models.Model):  # pragma: no cover - normalized away before
        raise TypeError("model instances are normalized to their pk before keying")
    return "r" + type(value).__qualname__ + ":" + repr(value)


def encode_values(values: Iterable[Any]) -> str:
    """Length-prefixed parts, so ("a:b", "c") and ("a", "b:c") differ."""
    if type(values) is tuple and len(values) == 1:
        p = encode_value(values[0])
        if len(p) < _MAX_PLAIN - 8:
            return f"{len(p)}.{p}"
    out = []
    for v in values:
        p = encode_value(v)
        out.append(f"{len(p)}.{p}")
    s = "".join(out)
    if len(s) > _MAX_PLAIN:
        return "h" + hashlib.sha256(s.encode()).hexdigest()
    return s


def row_id(pk: Any) -> str:
    """The id of a row inside a model's keys; contains no '|' (the payload header separator)."""
    return encode_values((pk,)).replace("%", "%25").replace("|", "%7C")


def pk_row_id(pk_field: Any, value: Any) -> str:
    """The row id of a pk value, the same whether it comes from an instance (a read) or
    from a statement's parameters (a write): the value as the ORM prepares it."""
    f = pk_field
    while f.is_relation:  # a multi-table child's pk is its parent link
        f = f.target_field
    return row_id(f.get_prep_value(f.to_python(value)))


def schema_fingerprint(model: type[models.Model]) -> str:
    """Changes whenever the model's stored fields change, so a deploy never decodes old rows."""
    parts = [FORMAT_VERSION, model._meta.label_lower]
    for f in model._meta.concrete_fields:
        cls = type(f)
        parts.append(f"{f.attname}/{f.column}/{cls.__module__}.{cls.__qualname__}/{f.null}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]
