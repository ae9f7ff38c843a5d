"""Every write statement Django runs, seen through connection.execute_wrapper().

Signals and our own queryset methods miss the writes Django runs below the managers
(Collector's SET_NULL/SET_DEFAULT/SET() updates, related managers' add/set/remove/clear
through `_base_manager`, `_raw_delete`, MTI parent updates, raw SQL through
`connection.cursor()`). Every one of them is a statement on a connection, so we watch
statements and never change one.

What a statement does to the cache is decided conservatively: an UPDATE or DELETE whose
WHERE clause is bounded by an explicit list of primary keys (the form Django uses for
save(), Collector deletes and updates, bulk_update, related add()) drops those rows; any
other UPDATE or DELETE flushes the group; an INSERT drops negative entries (new rows),
and one with ON CONFLICT / ON DUPLICATE KEY flushes. Reading a statement wrongly can only
make us drop more than needed, never less.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .conf import conf
from .groups import TableRole, table_roles
from .keys import row_id

ROWS, FLUSH, INSERT = "rows", "flush", "insert"

_IDENT = r'(?:"((?:[^"]|"")+)"|`([^`]+)`|\[([^\]]+)\]|([A-Za-z_][\w$]*))'
_HEAD = re.compile(
    r"\s*(update|delete\s+from|insert\s+(?:or\s+\w+\s+)?into|replace\s+into)\s+"
    + r"(?:" + _IDENT + r"\s*\.\s*)?" + _IDENT,
    re.IGNORECASE,
)
_ANY_IDENT = re.compile(_IDENT)
# Statements that may write but whose target we do not parse: every watched table they
# name is flushed.
_OTHER_WRITES = ("truncate", "with", "merge", "copy", "alter", "drop")
_FIRST = frozenset("udirtwmcaUDIRTWMCA \t\n(")


@dataclass(frozen=True)
class Effect:
    label: str  # root model label of the group (the alias comes from the connection)
    kind: str  # ROWS, FLUSH or INSERT
    rids: tuple[str, ...] = ()


def _name(groups: Sequence[str | None]) -> str:
    for g in groups:
        if g is not None:
            return g.replace('""', '"')
    return ""


def classify(sql: str, params: Any, many: bool) -> list[Effect]:
    """The effects of one statement on cached groups (empty for everything else)."""
    if not sql or sql[0] not in _FIRST:
        return []
    tables = table_roles()
    if not tables:
        return []
    m = _HEAD.match(sql)
    if m is None:
        word = sql.lstrip(" \t\n(").split(None, 1)[:1]
        if not word or word[0].lower() not in _OTHER_WRITES:
            return []
        return _flush_named(sql, tables)
    roles = tables.get(_name(m.groups()[5:])) or tables.get(_name(m.groups()[5:]).lower())
    if not roles:
        return []
    verb = m.group(1).lower()
    touched = [Effect(r.label, INSERT) for r in roles if r.touch]
    roles = [r for r in roles if not r.touch]
    if not roles:
        return touched
    if verb.startswith("insert"):
        low = sql.lower()
        # ON CONFLICT DO NOTHING (ignore_conflicts) changes no existing row.
        upsert = (" on conflict" in low and not low.rstrip("; ").endswith("do nothing")) or (
            " on duplicate key" in low)
        kind = FLUSH if upsert else INSERT
        return [Effect(r.label, kind) for r in roles]
    if verb.startswith("replace"):
        return [Effect(r.label, FLUSH) for r in roles]
    out = []
    for role in roles:
        pks = _pk_bound(sql, params, many, role) if role.by_row else None
        if pks is None or len(pks) > conf.BULK_INVALIDATION_LIMIT:
            out.append(Effect(role.label, FLUSH))
        else:
            out.append(Effect(role.label, ROWS, tuple(_rid(role, pk) for pk in pks)))
    return out


def _flush_named(sql: str, tables: dict[str, list[TableRole]]) -> list[Effect]:
    names = {_name(g) for g in _ANY_IDENT.findall(sql)}
    out: dict[str, Effect] = {}
    for name in names:
        for role in tables.get(name) or tables.get(name.lower()) or ():
            if role.label not in out or not role.touch:
                out[role.label] = Effect(role.label, INSERT if role.touch else FLUSH)
    return list(out.values())


def _rid(role: TableRole, value: Any) -> str:
    f = role.pk_field
    target = f.target_field if f.is_relation else f
    return row_id(target.get_prep_value(target.to_python(value)))


def _pk_bound(sql: str, params: Any, many: bool, role: TableRole) -> list[Any] | None:
    """The pk values an UPDATE/DELETE is limited to, when its WHERE clause is a
    conjunction with `pk = %s` or `pk IN (%s, ...)` at its top level; None otherwise."""
    if many or not isinstance(params, (list, tuple)):
        return None
    low = sql.lower()
    if "select" in low:  # a subquery could hold the WHERE we find
        return None
    at = low.rfind(" where ")
    if at < 0:
        return None
    if _placeholders(sql) != len(params):
        return None
    start = at + 7
    end = low.find(" returning ", start)  # refreshed fields (GeneratedField, db_default)
    where = sql[start:end if end >= 0 else len(sql)].rstrip().rstrip(";").rstrip()
    if where.startswith("(") and where.endswith(")") and _wrapped(where):
        where, start = where[1:-1], start + 1
    wl = where.lower()
    if " or " in wl or "not " in wl or ")or" in wl or ")and" in wl:
        return None
    col = re.escape(role.pk_column)
    pattern = re.compile(
        r'\s*(?:' + _IDENT + r'\s*\.\s*)?(?:"' + col + r'"|`' + col + r'`|\[' + col + r'\]|'
        + col + r')\s*(?:=\s*%s|in\s*\(\s*%s(?:\s*,\s*%s)*\s*\))\s*',
        re.IGNORECASE,
    )
    pos = start
    for conjunct in re.split(r"(?i)\band\b", where):
        m = pattern.fullmatch(conjunct)
        if m is not None:
            offset = _placeholders(sql[:pos])
            n = _placeholders(conjunct)
            return list(params[offset:offset + n])
        pos += len(conjunct) + 3
    return None


def _placeholders(text: str) -> int:
    return text.count("%s") - text.count("%%s")


def _wrapped(text: str) -> bool:
    """Whether the outer parentheses of text enclose all of it."""
    depth = 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0 and i != len(text) - 1:
                return False
    return depth == 0
