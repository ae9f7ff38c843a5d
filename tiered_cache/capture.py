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

import functools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.apps import apps
from django.db import connections, models

from .conf import conf
from .groups import concrete_of, primary_parent, root_label
from .keys import adapted_otherwise, equal_as_in_python, pk_row_id
from .registry import cached_models

__all__ = ["FLUSH", "INSERT", "ROWS", "Effect", "TableRole", "classify", "forget", "table_roles"]

ROWS, FLUSH, INSERT = "rows", "flush", "insert"

_IDENT = r'(?:"((?:[^"]|"")+)"|`([^`]+)`|\[([^\]]+)\]|([A-Za-z_][\w$]*))'
# A keyword ends at whitespace, or where a quoted name starts (`UPDATE"t"SET` is valid SQL).
_GAP = r"(?:\s+|(?=[\"`\[]))"
# The verb with the modifiers MySQL and SQLite allow before the target (UPDATE IGNORE,
# UPDATE OR REPLACE, DELETE LOW_PRIORITY QUICK FROM, INSERT DELAYED IGNORE INTO...).
_MODS = r"(?:\s+(?:or\s+\w+|low_priority|high_priority|delayed|quick|ignore))*"
_HEAD = re.compile(
    r"\s*(update"
    + _MODS
    + r"|delete"
    + _MODS
    + r"\s+from|insert"
    + _MODS
    + r"\s+into|replace"
    + _MODS
    + r"\s+into)"
    + _GAP
    + r"(?:only"  # PostgreSQL's UPDATE ONLY t, DELETE FROM ONLY t
    + _GAP
    + r")?"
    + r"(?:"  # a schema, after a database (MySQL) or a catalog (PostgreSQL) maybe
    + _IDENT
    + r"\s*\.\s*){0,2}"
    + _IDENT,
    re.IGNORECASE,
)
_ANY_IDENT = re.compile(_IDENT)
# Statements that may write but whose target we do not parse (MySQL's multi-table
# "DELETE t FROM t JOIN ...", TRUNCATE, MERGE, ...): every watched table they name is
# flushed. A WITH counts only when it holds a write.
_OTHER_WRITES = (
    "update",
    "delete",
    "insert",
    "replace",
    "truncate",
    "with",
    "merge",
    "copy",
    "alter",
    "drop",
    "explain",
    "load",  # MySQL's LOAD DATA ... REPLACE INTO TABLE t
)
_WRITE_WORD = re.compile(r"\b(update|delete|insert|merge|truncate)\b", re.IGNORECASE)
# The first characters of a statement that may write: its first word's, whitespace, a
# parenthesis, or a comment's (a write may follow one). Anything else (SELECT, SET,
# SAVEPOINT...) is one statement that does not write, unless more follow a semicolon.
_FIRST = frozenset("udirtwmcaelUDIRTWMCAEL \t\n\r\f\v(/-#")
# A statement's first word, wherever it ends (`TRUNCATE"t"`).
_FIRST_WORD = re.compile(r"[\s(]*([A-Za-z]+)")
# MySQL's `#` comments too (in PostgreSQL `#` is an operator, which a statement Django
# writes never holds: a statement with one is read as commented, dropping more).
_COMMENTS = re.compile(r"(?:\s+|--[^\n]*|#[^\n]*|/\*.*?\*/)+", re.DOTALL)


# -- which tables belong to which groups ------------------------------------------------


@dataclass(frozen=True)
class TableRole:
    """What a write to one table does to one group: rows by pk (the table's pk column is
    the group's row id), or the whole group (a secondary parent of a multiple-inheritance
    child, whose pk is not the child's), or only the group's write counter (`touch`: an
    auto-created many-to-many table, whose rows no entry holds but whose changes the
    group's derived functions and "no such row" entries must see)."""

    label: str
    pk_column: str
    pk_field: Any
    by_row: bool
    touch: bool = False


_T = TypeVar("_T")

_tables: dict[str, list[TableRole]] | None = None
# db_table -> labels of the groups whose rows a DELETE from it changes in the database
# itself: foreign keys with a database-level on_delete (Django 6.1's DB_CASCADE,
# DB_SET_NULL, DB_SET_DEFAULT), which no statement of Django's shows.
_deleting: dict[str, list[str]] = {}
# db_table -> labels of the groups a TRUNCATE ... CASCADE of it empties as well: every
# table a foreign key of any kind points from, and on along such keys.
_truncating: dict[str, list[str]] = {}


def table_roles() -> dict[str, list[TableRole]]:
    """db_table -> roles, for every table a cached model's rows are stored in."""
    global _tables, _deleting, _truncating
    if _tables is not None:
        return _tables
    if not apps.ready:
        return {}
    out: dict[str, dict[str, TableRole]] = {}
    # The roles serve every database: text keys compare as Python's only if on all of them.
    vendors = set()
    for alias in connections.settings:
        try:
            vendors.add(connections[alias].vendor)
        except Exception:  # a backend this process cannot load: not one to count on
            vendors.add("unknown")
    vendor = vendors.pop() if len(vendors) == 1 else "several"
    for model in cached_models():
        label = root_label(model)
        primary = set()
        m: type[models.Model] | None = model._meta.concrete_model
        while m is not None:
            primary.add(m)
            m = primary_parent(m)
        concrete = concrete_of(model)
        for m in [concrete, *concrete._meta.get_parent_list()]:
            pk = m._meta.pk
            # A pk the database compares otherwise than Python (a collation that ignores
            # case): a write may name the row by another spelling, so it drops the group.
            by_row = m in primary and equal_as_in_python(pk, vendor)
            role = TableRole(label, pk.column, pk, by_row=by_row)
            have = out.setdefault(m._meta.db_table, {}).get(label)
            if have is None or (have.by_row and not role.by_row):
                out[m._meta.db_table][label] = role
    cached_roots = {root_label(m) for m in cached_models()}
    for model in apps.get_models():
        for f in model._meta.local_many_to_many:
            through = f.remote_field.through
            assert through is not None  # set once the field is bound to its model
            if not through._meta.auto_created:
                continue  # an explicit through model is a model of its own
            for end in (model, f.remote_field.model):  # f.related_model, resolved
                label = root_label(end)
                if label in cached_roots:
                    pk = through._meta.pk
                    out.setdefault(through._meta.db_table, {}).setdefault(
                        label, TableRole(label, pk.column, pk, by_row=False, touch=True)
                    )
    tables = {t: list(roles.values()) for t, roles in out.items()}
    # _tables last: a thread that finds it set finds the maps built from it too.
    _deleting = _carried_on(tables, truncate=False)
    _truncating = _carried_on(tables, truncate=True)
    _tables = tables
    return tables


def _carried_on(tables: dict[str, list[TableRole]], truncate: bool) -> dict[str, list[str]]:
    """For each table, the groups a DELETE from it (truncate: a TRUNCATE ... CASCADE)
    changes in the database itself. A DELETE: through database-level on_delete, the rows
    of the tables whose foreign keys point at it (SET NULL, SET DEFAULT), and, where those
    delete in turn (CASCADE), the tables pointing at them. A TRUNCATE ... CASCADE: every
    table any foreign key points from, and on. Which rows is known to the database only:
    the whole group is flushed."""
    edges: dict[str, list[tuple[str, bool]]] = {}
    for model in apps.get_models(include_auto_created=True):
        for f in model._meta.local_fields:
            if f.remote_field is None or not getattr(f, "db_constraint", True):
                continue  # no foreign key in the database: it acts on nothing
            on_delete = getattr(f.remote_field, "on_delete", None)
            if not truncate and not hasattr(on_delete, "on_delete_sql"):
                continue  # Django's Python-side on_delete: its statements are seen
            target = f.remote_field.model._meta.db_table
            cascades = truncate or getattr(on_delete, "operation", "") == "CASCADE"
            edges.setdefault(target, []).append((model._meta.db_table, cascades))
    out: dict[str, list[str]] = {}
    for table in edges:
        labels: dict[str, None] = {}
        todo, seen = [table], {table}
        while todo:
            for child, cascades in edges.get(todo.pop(), ()):
                for role in tables.get(child, ()):
                    if truncate or not role.touch:
                        labels.setdefault(role.label, None)
                if cascades and child not in seen:
                    seen.add(child)
                    todo.append(child)
        if labels:
            out[table] = list(labels)
    return out


def forget(**kwargs: Any) -> None:
    """Models or settings changed (tests): map the tables again on next use."""
    global _tables
    _tables = None


@dataclass(frozen=True)
class Effect:
    label: str  # root model label of the group (the alias comes from the connection)
    kind: str  # ROWS, FLUSH or INSERT
    rids: tuple[str, ...] = ()


def _name(groups: Sequence[str | None]) -> str:
    for g in groups:
        if g:  # match.groups() gives None for an alternative not taken, findall() ""
            return g.replace('""', '"')
    return ""


def classify(sql: str, params: Any, many: bool) -> list[Effect]:
    """The effects of one statement on cached groups (empty for everything else). Never
    raises: a statement it cannot read drops every cached table it names."""
    try:
        if not sql or (sql[0] not in _FIRST and ";" not in sql):
            return []
        tables = table_roles()
        if not tables:
            return []
    except Exception:  # not text (a caller of ours passing bytes): nothing we can read
        return []
    try:
        body = sql.strip().rstrip(";")
        if ";" in body:  # several statements: read none of them, drop all they name
            return _flush_named(sql, tables)
        if body[:2] in ("--", "/*") or body[:1] == "#":  # a comment first: a hint, a tag
            skipped = _COMMENTS.match(body)
            if skipped is None or "%" in skipped.group():
                return _flush_named(sql, tables)  # a placeholder in it: params not read
            rest = body[skipped.end() :]
            effects = _classify(rest, params, many, tables)
            if effects or not _WRITE_WORD.search(rest):
                return effects
            # Not read (PostgreSQL nests comments): unless a SELECT, drop all it names.
            word = rest.split(None, 1)[:1]
            return [] if word and word[0].lower() == "select" else _flush_named(sql, tables)
        return _classify(sql, params, many, tables)
    except Exception:
        return _flush_named(sql, tables)


def _classify(
    sql: str, params: Any, many: bool, tables: dict[str, list[TableRole]]
) -> list[Effect]:
    m = _HEAD.match(sql)
    if m is None:
        first = _FIRST_WORD.match(sql)
        word = first.group(1).lower() if first else ""
        if word not in _OTHER_WRITES:
            return []
        if word == "with" and not _WRITE_WORD.search(sql):
            return []
        if word == "explain" and not (
            re.search(r"\banaly[sz]e\b", sql, re.IGNORECASE) and _WRITE_WORD.search(sql)
        ):
            return []  # runs the statement only with ANALYZE
        flushed = _flush_named(sql, tables)
        if word == "truncate":
            carried = _truncating if "cascade" in sql.lower() else {}
        else:  # a DELETE we do not parse (in a WITH, MySQL's multi-table form) may be one
            carried = _deleting if re.search(r"\bdelete\b", sql, re.IGNORECASE) else {}
        if carried:
            done = {e.label for e in flushed}
            for name in {_name(g) for g in _ANY_IDENT.findall(sql)}:
                for label in _of_table(carried, name):
                    if label not in done:
                        done.add(label)
                        flushed.append(Effect(label, FLUSH))
        return flushed
    groups = m.groups()
    schema, name = _name(groups[1:5]), _name(groups[5:])
    verb = m.group(1).lower()
    also = _of_table(_deleting, name, schema) if verb.startswith("delete") else []
    roles = _of_table(tables, name, schema)
    # A comment inside the statement (`ON /* x */ CONFLICT`, `OR -- ...`, `ONLY/**/t`)
    # hides words the reading below looks for.
    commented = "--" in sql or "/*" in sql or "#" in sql
    if not roles:
        # Not a cached table; unless another word was read as the table (a comment in the
        # way, `ONLY (t)`, a form we do not know), which then drops what the statement names.
        if (commented or not _continues(verb, sql[m.end() :])) and _names_cached(sql, tables):
            return _flush_named(sql, tables) + _flushed(also)
        return _flushed(also)
    if commented:  # drop every model it names
        return _flush_named(sql, tables) + _flushed(also)
    return _flushed(also) + _classify_roles(
        sql, params, many, verb, roles, _alone(verb, sql[m.end() :])
    )


# What may follow the target of an UPDATE or DELETE that names no other table: an alias,
# then SET (an UPDATE) or WHERE (a DELETE), or nothing.
_ALIAS = r"\s*(?:(?:as\s+)?" + _IDENT + r"\s+)??"
_UPDATE_ALONE = re.compile(_ALIAS + r"set\b", re.IGNORECASE)
_FROM = re.compile(r"\bfrom\b", re.IGNORECASE)
_DELETE_ALONE = re.compile(_ALIAS + r"(?:where\b|returning\b|$)", re.IGNORECASE)


def _flushed(labels: list[str]) -> list[Effect]:
    return [Effect(label, FLUSH) for label in labels]


_cached_names: tuple[dict[str, list[TableRole]], re.Pattern[str]] | None = None


def _names_cached(sql: str, tables: dict[str, list[TableRole]]) -> bool:
    """Whether a cached table's name appears anywhere in sql, as a whole name: checked when
    the target _HEAD read is not one (`UPDATE ONLY (t)`, a three-part name), before
    _flush_named reads which."""
    global _cached_names
    if _cached_names is None or _cached_names[0] is not tables:
        names = sorted({n.split('"."')[-1].split(".")[-1] for n in tables}, key=len)
        alternatives = "|".join(re.escape(n) for n in reversed(names)) or "(?!)"
        pattern = r"(?<![\w$])(?:" + alternatives + r")(?![\w$])"
        _cached_names = (tables, re.compile(pattern, re.IGNORECASE))
    return _cached_names[1].search(sql) is not None


# What follows an INSERT's target: its columns, its rows, or MySQL's SET form.
_INSERT_NEXT = re.compile(
    r"\s*(?:\(|values\b|select\b|default\b|set\b|with\b|partition\b|as\b|on\b|$)",
    re.IGNORECASE,
)
_UPDATE_NEXT = re.compile(_ALIAS + r"(?:set\b|inner\b|left\b|join\b|,)", re.IGNORECASE)
_DELETE_NEXT = re.compile(_ALIAS + r"(?:where\b|using\b|returning\b|$)", re.IGNORECASE)


def _continues(verb: str, rest: str) -> bool:
    """Whether what follows the target _HEAD read is what follows a table's name in that
    statement: then the name was the table's."""
    if verb.startswith("update"):
        return _UPDATE_NEXT.match(rest) is not None
    if verb.startswith("delete"):
        return _DELETE_NEXT.match(rest.rstrip().rstrip(";")) is not None
    return _INSERT_NEXT.match(rest) is not None


def _alone(verb: str, rest: str) -> bool:
    """Whether an UPDATE or DELETE writes rows of its target table chosen by that table's
    own columns only: no FROM, USING, JOIN or second table (PostgreSQL's UPDATE ... FROM,
    DELETE ... USING, MySQL's multi-table forms), where a qualified `id = %s` in the WHERE
    clause may be another table's."""
    if verb.startswith("update"):
        m = _UPDATE_ALONE.match(rest)
        return m is not None and _FROM.search(rest) is None
    if verb.startswith("delete"):
        return _DELETE_ALONE.match(rest.rstrip().rstrip(";")) is not None
    return True


def _of_table(by_table: dict[str, list[_T]], name: str, schema: str = "") -> list[_T]:
    """The entry of a table SQL names: as written or folded to lower case (an unquoted
    name), or with its schema for a db_table that has one in it ('billing"."invoice')."""
    found = by_table.get(name) or by_table.get(name.lower())
    if schema and not found:
        found = by_table.get(f'{schema}"."{name}') or by_table.get(f"{schema}.{name}")
    return found or []


_UPSERT = re.compile(r"\bdo\s+update\b|\bon\s+duplicate\s+key\b", re.IGNORECASE)
_REPLACING = re.compile(r"\bor\s+(?!ignore\b)")


def _classify_roles(
    sql: str, params: Any, many: bool, verb: str, roles: list[TableRole], alone: bool = True
) -> list[Effect]:
    """The effects of a write statement (`verb`) on the groups whose rows its table holds
    (alone: it names no other table, see _alone)."""
    touched = [Effect(r.label, INSERT) for r in roles if r.touch]
    roles = [r for r in roles if not r.touch]
    if not roles:
        return touched
    if verb.startswith("insert"):
        # ON CONFLICT DO NOTHING and INSERT IGNORE (ignore_conflicts) change no existing
        # row; an upsert (ON CONFLICT ... DO UPDATE, ON DUPLICATE KEY UPDATE, SQLite's
        # INSERT OR REPLACE) does. Found anywhere, whatever spaces them: a literal that
        # reads like one only drops more.
        upsert = _UPSERT.search(sql) is not None or _REPLACING.search(verb) is not None
        kind = FLUSH if upsert else INSERT
        return [Effect(r.label, kind) for r in roles]
    if verb.startswith("replace") or _REPLACING.search(verb) is not None:
        # REPLACE INTO, and SQLite's UPDATE OR REPLACE, which deletes the rows its new
        # values conflict with
        return [Effect(r.label, FLUSH) for r in roles]
    out = []
    for role in roles:
        pks = _pk_bound(sql, params, many, role) if role.by_row and alone else None
        if pks is None or len(pks) > conf.BULK_INVALIDATION_LIMIT:
            out.append(Effect(role.label, FLUSH))
            continue
        try:
            rids = tuple(_rid(role, pk) for pk in pks)
        except Exception:  # a value the database will refuse: let it say so
            out.append(Effect(role.label, FLUSH))
            continue
        out.append(Effect(role.label, ROWS, rids))
    return out


def _flush_named(sql: str, tables: dict[str, list[TableRole]]) -> list[Effect]:
    names = {_name(g) for g in _ANY_IDENT.findall(sql)}
    out: dict[str, Effect] = {}
    for name in names:
        for role in _of_table(tables, name):
            if role.label not in out or not role.touch:
                out[role.label] = Effect(role.label, INSERT if role.touch else FLUSH)
    return list(out.values())


def _rid(role: TableRole, value: Any) -> str:
    if adapted_otherwise(value):  # the row it names is not known here: the model drops
        raise TypeError(f"a pk of {type(value).__qualname__} may be sent as another value")
    return pk_row_id(role.pk_field, value)


def _pk_bound(sql: str, params: Any, many: bool, role: TableRole) -> list[Any] | None:
    """The pk values an UPDATE/DELETE is limited to, when its WHERE clause is a
    conjunction with `pk = %s` or `pk IN (%s, ...)` at its top level; None otherwise."""
    if many or not isinstance(params, (list, tuple)):
        return None
    # Backslash escapes, dollar quotes and brackets (SQLite's [names], PostgreSQL's
    # subscripts, either may hold a quote) are what _TOKENS does not read (comments were
    # refused before).
    if _placeholders(sql) != len(params) or "\\" in sql or "$" in sql or "[" in sql:
        return None
    # The words and parentheses that shape the WHERE clause, outside literals and quoted
    # names, with their depth in parentheses.
    tokens: list[tuple[str, int, int, int]] = []
    depth, where = 0, -1
    # Lower case, the same length (str.lower() may lengthen a non-ASCII name).
    low = sql.lower() if sql.isascii() else sql.translate(_ASCII_LOWER)
    for m in _TOKENS.finditer(low):
        word = m[0]
        first = word[0]
        if first in "'\"`":
            continue
        if first == ")":
            depth -= 1
            if depth < 0:
                return None
        elif word == "select":  # a subquery could hold the WHERE we find
            return None
        elif word == "where" and depth == 0:
            where = len(tokens)
        tokens.append((word, m.start(), m.end(), depth))
        if first == "(":
            depth += 1
    if depth or where < 0:
        return None
    start, end = tokens[where][2], len(sql)
    clause = tokens[where + 1 :]
    # OR (||, XOR) or a CASE may widen what a conjunct bounds; NOT cannot, as a bound's
    # conjunct is all of `pk = %s` (NOT around a group puts it below the top level).
    # Looked for up to the end, past a RETURNING too (MySQL does not reserve the word).
    if any(word in _WIDENS for word, *_ in clause):
        return None
    for i, (word, s, _, d) in enumerate(clause):
        if word == "returning" and d == 0:  # refreshed fields: GeneratedField, db_default
            clause, end = clause[:i], s
            break
    while end > start and sql[end - 1] in " \t\r\n;":
        end -= 1
    pattern = _pk_pattern(role.pk_column)
    for s, e in _conjuncts(sql, clause, start, end, 0):
        if pattern.fullmatch(sql, s, e) is not None:
            offset = _placeholders(sql[:s])
            return list(params[offset : offset + _placeholders(sql[s:e])])
    return None


# The first character is looked ahead for: most of a statement is skipped without trying
# each alternative. Doubled quotes inside a literal or a name read as two of them.
_TOKENS = re.compile(
    r"""(?=['"`()|&wraoxcsb])(?:'[^']*'|"[^"]*"|`[^`]*`|[()]|\|\||&&"""
    # a keyword may touch a placeholder (`= %sOR TRUE` is valid once psycopg fills it in)
    # or a number (`= 1OR TRUE`, before PostgreSQL 15)
    r"|(?:(?<=%s)|(?<![a-z_$]))(?:where|returning|and|x?or|case|select|between)\b)"
)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_WIDENS = frozenset(("or", "xor", "case", "||", "&&"))


def _conjuncts(
    sql: str, tokens: list[tuple[str, int, int, int]], start: int, end: int, depth: int
) -> list[tuple[int, int]]:
    """The spans of sql[start:end]'s conjuncts at `depth`: split at each AND there, and
    into a conjunct that is all one parenthesised group (Django wraps a WHERE of several
    conditions)."""
    spans, at = [], start
    between = False  # the next AND at this depth closes a BETWEEN: not a conjunction
    for word, s, e, d in tokens:
        if d != depth:
            continue
        if word == "between":
            between = True
        elif word == "and":
            if between:
                between = False
            else:
                spans.append((at, s))
                at = e
    spans.append((at, end))
    out = []
    for s, e in spans:
        inside = [t for t in tokens if s <= t[1] and t[2] <= e]
        text = sql[s:e].strip()
        if (
            inside
            and inside[0][0] == "("
            and inside[-1][0] == ")"
            and text.startswith("(")
            and text.endswith(")")
            and not any(t[3] == depth for t in inside[1:-1])
        ):
            out.extend(_conjuncts(sql, inside[1:-1], inside[0][2], inside[-1][1], depth + 1))
        else:
            out.append((s, e))
    return out


@functools.lru_cache(maxsize=256)
def _pk_pattern(column: str) -> re.Pattern[str]:
    """`[schema.][table.]pk = %s` or `... IN (%s, ...)`, spaced or not, the pk column quoted
    or not."""
    col = re.escape(column)
    return re.compile(
        r"\s*(?:"
        + _IDENT
        # A quoted name in its own case (PostgreSQL's "ID" is another column than "id").
        + r'\s*\.\s*){0,2}(?:(?-i:"'
        + col
        + r'")|`'
        + col
        + r"`|\["
        + col
        + r"\]|"
        + col
        + r")\s*(?:=\s*%s|in\s*\(\s*%s(?:\s*,\s*%s)*\s*\))\s*",
        re.IGNORECASE,
    )


def _placeholders(text: str) -> int:
    return text.count("%s") - text.count("%%s")
