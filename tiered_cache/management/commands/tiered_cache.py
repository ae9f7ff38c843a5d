"""`manage.py tiered_cache stats|flush|warmup|cleanup [app.Model ...]` and `inspect
app.Model field=value ...`: thin over the maintenance, dashboard and inspection modules."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tiered_cache import maintenance
from tiered_cache.dashboard import overview
from tiered_cache.inspection import CannotInspect, Inspection, TierState, inspect_entry
from tiered_cache.registry import UnknownModel, cached_models, resolve_models
from tiered_cache.tiers.remote import Unavailable


def _when(run: dict[str, Any] | None) -> str:
    if not run:
        return "never"
    return datetime.fromtimestamp(run["at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Command(BaseCommand):
    help = "Operate the tiered cache: show stats, flush, warm up, clean up, inspect one entry."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        models_help = "models as app_label.ModelName (default: every cached model)"

        stats = sub.add_parser("stats", help="counters of all processes, L1 and L2 sizes")
        stats.add_argument("models", nargs="*", metavar="app.Model", help=models_help)
        stats.add_argument("--json", action="store_true", help="print JSON")

        flush = sub.add_parser("flush", help="drop every entry of models in every process")
        flush.add_argument("models", nargs="*", metavar="app.Model")
        flush.add_argument("--all", action="store_true", help="flush every cached model")

        warm = sub.add_parser("warmup", help="fill L2 with each model's warmup set")
        warm.add_argument("models", nargs="*", metavar="app.Model", help=models_help)
        warm.add_argument(
            "--limit", type=int, default=None, metavar="N", help="at most N rows per model"
        )

        clean = sub.add_parser("cleanup", help="delete what Redis can no longer serve")
        clean.add_argument("models", nargs="*", metavar="app.Model", help=models_help)

        look = sub.add_parser(
            "inspect",
            help="what each tier holds for one lookup, and whether a read would be served",
            description="Show what this process's L1, L2 (Redis) and the database hold for "
            "one declared lookup of a cached model, and whether a read would be served, or "
            "why not. Read-only: no tier is changed.",
        )
        look.add_argument("model", metavar="app.Model")
        look.add_argument(
            "lookup",
            nargs="+",
            metavar="field=value",
            help="a declared lookup: pk=1, email=a@b.c, tenant_id=t1 session_id=s1",
        )
        look.add_argument("--manager", help="a cached manager's name (default: the first)")
        look.add_argument("--database", help="the database alias read (default: the router's)")
        look.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        try:
            models = resolve_models(options["models"]) if options.get("models") else None
            getattr(self, f"_{action}")(models, options)
        except (UnknownModel, CannotInspect) as exc:
            raise CommandError(str(exc)) from None
        except Unavailable as exc:
            raise CommandError(f"Redis is unavailable: {exc}") from None

    def _stats(self, models: Any, options: dict[str, Any]) -> None:
        view = overview(models)
        if options["json"]:
            out = {
                "redis_error": view["redis_error"],
                "breaker": view["breaker"],
                "bus": view["bus"],
                "outbox": view["outbox"],
                "last_cleanup": view["last_cleanup"],
                "models": {
                    row["label"]: {
                        "lookups": row["lookups"],
                        "l1_entries": row["l1_entries"],
                        "l2_entries": row["l2_entries"],
                        "l2_bytes": row["l2_bytes"],
                        "scope": row["scope"],
                        "hit_ratio": row["hit_ratio"],
                        "tiers": {tier: n for tier, n, _ in row["tiers"]},
                        **{k: v for k, v in row["counters"].items() if k != "hot"},
                        "hot": row["counters"].get("hot", []),
                        "last_warmup": row["last_warmup"],
                    }
                    for row in view["models"]
                },
            }
            self.stdout.write(json.dumps(out, indent=2, default=str))
            return
        if view["redis_error"]:
            self.stderr.write(
                f"Redis is unavailable ({view['redis_error']}): counters of this process only."
            )
        head = (
            "model",
            "lookups",
            "L1",
            "L2",
            "L1 hits",
            "L2 hits",
            "negative",
            "DB reads",
            "hit ratio",
            "last warmup",
        )
        lines = [head]
        for row in view["models"]:
            c = row["counters"]
            ratio = "-" if row["hit_ratio"] is None else f"{row['hit_ratio']:.1%}"
            lines.append(
                (
                    row["label"],
                    ", ".join(row["lookups"]),
                    str(row["l1_entries"]),
                    "?" if row["l2_entries"] is None else str(row["l2_entries"]),
                    str(c.get("l1_hits", 0)),
                    str(c.get("l2_hits", 0)),
                    str(c.get("negative_hits", 0)),
                    str(c.get("misses", 0)),
                    ratio,
                    _when(row["last_warmup"]),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        for line in lines:
            cells = (cell.ljust(w) for cell, w in zip(line, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())
        self.stdout.write(
            f"breaker {view['breaker']}, bus {view['bus']}, outbox {view['outbox']}, "
            f"last cleanup {_when(view['last_cleanup'])}"
        )

    def _flush(self, models: Any, options: dict[str, Any]) -> None:
        if models and options["all"]:
            raise CommandError("Name models to flush or pass --all, not both.")
        if not models and not options["all"]:
            raise CommandError("Name the models to flush (app_label.ModelName) or pass --all.")
        for label in maintenance.flush(models):
            self.stdout.write(f"Flushed every {label} entry (all processes).")

    def _warmup(self, models: Any, options: dict[str, Any]) -> None:
        limit = options["limit"]
        if limit is not None and limit < 0:
            raise CommandError("--limit must be zero or more.")
        for model in models or cached_models():
            r = maintenance.warmup(model, limit)
            self.stdout.write(
                f"{r['model']}: stored {r['stored']}, refused {r['refused']} "
                f"({r.get('source')}) in {r['seconds']}s"
            )

    def _cleanup(self, models: Any, options: dict[str, Any]) -> None:
        r = maintenance.cleanup(models)
        self.stdout.write(
            f"Scanned {r['scanned']} keys; deleted {r['old_generation']} of old generations, "
            f"{r['stale_rows']} of replaced rows, {r['old_schema']} of old schemas; dropped "
            f"{r['hot_members']} cold hot-row samples, {r['stale_processes']} silent "
            f"processes; pruned {r['l1_expired']} expired L1 entries here."
        )

    def _inspect(self, models: Any, options: dict[str, Any]) -> None:
        found = inspect_entry(
            options["model"],
            options["lookup"],
            manager=options["manager"],
            using=options["database"],
        )
        if options["json"]:
            self.stdout.write(json.dumps(found.as_dict(), indent=2))
            return
        for line in _inspection_lines(found):
            self.stdout.write(line)


def _inspection_lines(found: Inspection) -> list[str]:
    lines = [
        f"{found.model} {found.lookup_text()} (manager {found.manager}, database {found.database})",
        f"Would be served: {found.verdict}",
        f"Bus in this process: {found.bus_text()}",
    ]

    def tier(title: str, key: str, t: TierState) -> None:
        lines.append("")
        lines.append(title)
        rows = [("key", key), *t.facts, ("state", t.state_text())]
        width = max(len(label) for label, _ in rows)
        lines.extend(f"  {label.ljust(width)}  {text}" for label, text in rows)

    tier("L1 (this process)", repr(found.l1_key), found.l1)
    tier("L2 (Redis)", found.l2_key or "-", found.l2)
    lines.append("")
    lines.append(f"Database ({found.db.query})")
    if found.db.error:
        lines.append(f"  {found.db.error}")
    elif not found.db.exists:
        lines.append("  no such row")
    else:
        lines.append(f"  a row (pk {found.db.pk!r})")
        diffs = found.differences()
        if diffs:
            width = max(len(f) for f, _, _ in diffs)
            for field, cached, db in diffs:
                lines.append(f"  {field.ljust(width)}  cached {cached}, database {db}")
    return lines
