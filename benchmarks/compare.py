"""`python -m benchmarks compare A.json B.json`: the change from run A to run B.

Points are matched on target, model, mode, client and concurrency (or rate); for each the
throughput, p50 and p99 of both runs and the change in percent, then the limits and the ratios
to ideal. Points only one run has are listed at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "Print the change between two benchmark runs (run.json files)."


def _key(r: dict) -> tuple:
    where = ("c", r["concurrency"]) if "concurrency" in r else ("rate", r.get("rate"))
    # A run with --rounds measures each point once per round (0 without rounds).
    return (r["target"], r["model"], r["mode"], r["client"], *where, r.get("round", 0))


def _label(key: tuple) -> str:
    target, model, mode, client, kind, value, round_index = key
    rounds = f" round {round_index + 1}" if round_index else ""
    return f"{target} {model} {mode} {client} {kind}={value:g}{rounds}"


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    if a == 0:
        return "new" if b else "0%"
    return f"{(b - a) / a * 100:+.1f}%"


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _p(r: dict | None, key: str) -> float | None:
    return ((r or {}).get("latency_ms") or {}).get(key)


def compare(a: dict, b: dict) -> str:
    """The comparison as text (a markdown table and lists)."""
    a_points = {_key(r): r for r in a.get("results", [])}
    b_points = {_key(r): r for r in b.get("results", [])}
    lines = [
        f"A: {a.get('started')} tiffin {(a['environment'].get('tiffin_commit') or '?')[:10]}",
        f"B: {b.get('started')} tiffin {(b['environment'].get('tiffin_commit') or '?')[:10]}",
        "",
        "| point | A req/s | B req/s | change | A p50 ms | B p50 ms | change | A p99 ms "
        "| B p99 ms | change |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in (k for k in a_points if k in b_points):
        ra, rb = a_points[key], b_points[key]
        ta, tb = ra.get("throughput"), rb.get("throughput")
        cells = [_label(key), _n(ta), _n(tb), _change(ta, tb)]
        for q in ("p50", "p99"):
            cells += [_n(_p(ra, q), 3), _n(_p(rb, q), 3), _change(_p(ra, q), _p(rb, q))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for model in (m for m in a.get("limit", {}) if m in b.get("limit", {})):
        la, lb = a["limit"][model]["best_items_per_s"], b["limit"][model]["best_items_per_s"]
        lines.append(f"- limit {model}: {la:,.0f} -> {lb:,.0f} items/s ({_change(la, lb)})")
    a_derived = {_dkey(d): d for d in a.get("derived", [])}
    for d in b.get("derived", []):
        before = a_derived.get(_dkey(d), {}).get("ratio_ideal")
        if before is not None and d.get("ratio_ideal") is not None:
            lines.append(
                f"- ÷ ideal, {d.get('target', 'tiffin')} {d['model']} {d['mode']} {d['client']} "
                f"c={d['concurrency']}: "
                f"{before:.2f} -> {d['ratio_ideal']:.2f}"
            )
    only_a = [_label(k) for k in a_points if k not in b_points]
    only_b = [_label(k) for k in b_points if k not in a_points]
    if only_a:
        lines.append(f"- only in A: {', '.join(only_a)}")
    if only_b:
        lines.append(f"- only in B: {', '.join(only_b)}")
    return "\n".join(lines) + "\n"


def _dkey(d: dict) -> tuple[Any, ...]:
    return (
        d.get("target", "tiffin"),
        d["model"],
        d["mode"],
        d["client"],
        d["concurrency"],
        d.get("round", 0),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="the earlier run.json")
    parser.add_argument("b", type=Path, help="the later run.json")


def main(args: argparse.Namespace) -> int:
    print(compare(json.loads(args.a.read_text()), json.loads(args.b.read_text())), end="")
    return 0
