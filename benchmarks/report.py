"""What a run writes: run.json (everything), results.md (the tables), results.png (the plot).

Every Tiffin figure stands beside the limit (best in-process items/s of the model) and the
*ideal*, 1 / (1/limit + 1/echo), where echo is the better of the two echo servers measured with
the same client, mode and concurrency: a server that added nothing to the model's compute and
the minimal transport would reach it.

A run with peers or `tiffin-tuned` (`run --side-by-side`) also gets the side-by-side table:
one row per server, one column per model and concurrency (unary), Tiffin's ratios to the limit
and to ideal under its figures, and whether Tiffin is ahead of every peer at every point and
within 5% of the hand-tuned config.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# BENCHMARKS.md's bar for Tiffin, with the server on one core.
BAR_RATIO_IDEAL = 0.9  # at the highest concurrency, unary and streaming
BAR_P50_SLACK_MS = 0.3  # concurrency 1: p50 within this of batch-1 limit + echo p50
# The bar for the config a user writes: within this of the hand-tuned config.
BAR_DEFAULT_VS_TUNED = 0.95


def _finite(value: Any) -> Any:
    """The value with NaN and infinities made None, so that the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# Tiffin as measured: with REST beside gRPC (as served by default), and with REST off.
TIFFIN_TARGETS = {
    "tiffin": "Tiffin",
    "tiffin-tuned": "Tiffin, hand-tuned (kind: inline, intra_op_thread_count: 1)",
    "tiffin-nohttp": "Tiffin, REST off",
    "tiffin-nometrics": "Tiffin, metrics off",
}
# The side-by-side table's row names (BENCHMARKS.md's wording).
USER_CONFIG_LABEL = "Tiffin, `max_batch_size: 64` + `dynamic_batching: {}` only"
TUNED_LABEL = "Tiffin, + `intra_op_thread_count: 1` + `kind: inline`"
# Which client's figure a side-by-side cell shows, first found first.
CLIENT_PREFERENCE = ("lean", "raw_http", "json_http", "tritonclient", "rest", "perf_analyzer")
SIDE_BY_SIDE_SKIP = ("tiffin-nohttp", "tiffin-nometrics")

# perf_analyzer's modes -> the lean client's, for an echo figure measured only by the latter.
_LEAN_MODE = {"unary_async": "unary"}


def _same_point(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model", "mode", "client", "concurrency"))


def derive(limits: dict, results: list[dict]) -> list[dict]:
    """Ratios of every closed-loop Tiffin figure to the limit and to the ideal."""
    echoes = [r for r in results if r["target"].startswith("echo-") and r.get("throughput")]
    derived = []
    for r in results:
        if r["target"] not in TIFFIN_TARGETS or "concurrency" not in r or not r.get("throughput"):
            continue
        model_limit = limits.get(r["model"], {})
        limit = model_limit.get("best_items_per_s")
        # The echo of the same round where the run had several, else of any.
        matching = [e for e in echoes if _same_point(e, r) and e.get("round") == r.get("round")]
        matching = matching or [e for e in echoes if _same_point(e, r)]
        if not matching:  # e.g. perf_analyzer not run against an echo server: the lean echo
            lean = {**r, "client": "lean", "mode": _LEAN_MODE.get(r["mode"], r["mode"])}
            matching = [e for e in echoes if _same_point(e, lean)]
        best = max(matching, key=lambda e: e["throughput"], default=None)
        echo = best["throughput"] if best else None
        ideal = 1 / (1 / limit + 1 / echo) if limit and echo else None
        entry: dict[str, Any] = {
            **({"round": r["round"]} if "round" in r else {}),
            "target": r["target"],
            "model": r["model"],
            "mode": r["mode"],
            "client": r["client"],
            "concurrency": r["concurrency"],
            "throughput": r["throughput"],
            "limit": limit,
            "echo": echo,
            "echo_target": best["target"] if best else None,
            "echo_client": best["client"] if best else None,
            "ideal": ideal,
            "ratio_limit": r["throughput"] / limit if limit else None,
            "ratio_ideal": r["throughput"] / ideal if ideal else None,
        }
        p50 = (r.get("latency_ms") or {}).get("p50")
        echo_p50s: list[float] = [
            e["latency_ms"]["p50"] for e in matching if (e.get("latency_ms") or {}).get("p50")
        ]
        batch1 = model_limit.get("batch1_p50_ms")
        if r["concurrency"] == 1 and p50 is not None and echo_p50s and batch1 is not None:
            floor = batch1 + min(echo_p50s)
            entry["p50_floor_ms"] = floor
            entry["p50_excess_ms"] = p50 - floor
        derived.append(entry)
    return derived


# ---- side by side -------------------------------------------------------------------------


def _is_peer(target: str) -> bool:
    return not target.startswith(("tiffin", "echo-"))


def _figure(results: list[dict], target: str, model: str, concurrency: int) -> dict:
    """One server's figure at one point, from the preferred client: the median over the
    run's rounds (a single round: its figure), the client, and every round's figure."""
    found = [
        r
        for r in results
        if (r["target"], r["model"], r["concurrency"]) == (target, model, concurrency)
        and r.get("throughput") is not None
        and "error" not in r
    ]
    if not found:
        return {"throughput": None, "client": None}
    rank = {c: i for i, c in enumerate(CLIENT_PREFERENCE)}
    client = min((r["client"] for r in found), key=lambda c: rank.get(c, len(rank)))
    values = [r["throughput"] for r in found if r["client"] == client]
    figure: dict[str, Any] = {"throughput": statistics.median(values), "client": client}
    if len(values) > 1:
        figure["rounds"] = values
    return figure


def _row_label(run: dict, target: str) -> str:
    settings = run.get("settings", {})
    if target == "tiffin":
        return USER_CONFIG_LABEL if settings.get("tiffin_config") == "user" else "Tiffin"
    if target == "tiffin-tuned":
        return TUNED_LABEL
    return (settings.get("peers") or {}).get(target, target)


def side_by_side(run: dict) -> dict | None:
    """The side-by-side comparison (unary, closed loop), or None for a run without peers or
    tiffin-tuned: rows of servers, columns of model x concurrency (highest first), Tiffin's
    ratios, the reference figures, and the verdicts."""
    results = [r for r in run.get("results", []) if "concurrency" in r and r["mode"] == "unary"]
    targets = [
        t
        for t in dict.fromkeys(r["target"] for r in results)
        if not t.startswith("echo-") and t not in SIDE_BY_SIDE_SKIP
    ]
    peers = [t for t in targets if _is_peer(t)]
    if not peers and "tiffin-tuned" not in targets:
        return None
    models = list(
        run.get("settings", {}).get("models") or dict.fromkeys(r["model"] for r in results)
    )
    concurrencies = sorted({r["concurrency"] for r in results}, reverse=True)
    columns = [{"model": m, "concurrency": c} for c in concurrencies for m in models]
    # The transport ceiling as the lean client measured it (every echo server, each a median).
    lean = [r for r in results if r["client"] == "lean"]
    echo_targets = [t for t in dict.fromkeys(r["target"] for r in lean) if t.startswith("echo-")]
    references = []
    for col in columns:
        echoes = [
            _figure(lean, t, col["model"], col["concurrency"])["throughput"] for t in echo_targets
        ]
        limit = (run.get("limit", {}).get(col["model"]) or {}).get("best_items_per_s")
        echo = max((e for e in echoes if e), default=None)
        ideal = 1 / (1 / limit + 1 / echo) if limit and echo else None
        references.append({"limit": limit, "echo": echo, "ideal": ideal})
    rows = []
    for target in targets:
        cells = []
        for col, ref in zip(columns, references, strict=True):
            cell = _figure(results, target, col["model"], col["concurrency"])
            if target.startswith("tiffin") and cell["throughput"] is not None:
                cell["ratio_limit"] = cell["throughput"] / ref["limit"] if ref["limit"] else None
                cell["ratio_ideal"] = cell["throughput"] / ref["ideal"] if ref["ideal"] else None
            cells.append(cell)
        rows.append({"target": target, "label": _row_label(run, target), "cells": cells})
    by_target = {row["target"]: row["cells"] for row in rows}
    verdicts: dict[str, Any] = {}
    for tiffin in (t for t in ("tiffin", "tiffin-tuned") if t in by_target and peers):
        behind = []
        for i, col in enumerate(columns):
            own = by_target[tiffin][i]["throughput"]
            for peer in peers:
                other = by_target[peer][i]["throughput"]
                if other is not None and (own is None or own <= other):
                    behind.append({**col, "peer": peer, "tiffin": own, "peer_throughput": other})
        verdicts[f"{tiffin}_ahead_of_peers"] = {"ahead": not behind, "behind": behind}
    if "tiffin" in by_target and "tiffin-tuned" in by_target:
        points = []
        for i, col in enumerate(columns):
            own, tuned = (
                by_target["tiffin"][i]["throughput"],
                by_target["tiffin-tuned"][i]["throughput"],
            )
            ratio = own / tuned if own is not None and tuned else None
            points.append({**col, "ratio": ratio})
        within = all(p["ratio"] is not None and p["ratio"] >= BAR_DEFAULT_VS_TUNED for p in points)
        verdicts["default_vs_tuned"] = {"within": within, "points": points}
    return {"columns": columns, "rows": rows, "references": references, "verdicts": verdicts}


# ---- markdown ----------------------------------------------------------------------------


def _n(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _lat(result: dict, key: str) -> str:
    return _n((result.get("latency_ms") or {}).get(key), 3)


def _errors(result: dict) -> str:
    if "error" in result:
        return "failed"
    errors = result.get("errors") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def _conc(result: dict) -> str:
    """The concurrency, and the round where a run measured every server several times."""
    rounds = f" (round {result['round'] + 1})" if "round" in result else ""
    return f"{result['concurrency']}{rounds}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _header(run: dict) -> list[str]:
    env, settings = run["environment"], run["settings"]
    packages = env.get("packages", {})
    commit = (env.get("tiffin_commit") or "unknown")[:10]
    dirty = " + uncommitted changes" if env.get("tiffin_dirty") else ""
    load = run.get("load_average", {})
    before, after = load.get("before") or ["?"], load.get("after") or ["?"]
    during = [r["load_1min"] for r in run.get("results", []) if r.get("load_1min") is not None]
    peak = f", highest 1-min during the points {max(during)}" if during else ""
    lines = [
        f"# Tiffin benchmark, {run.get('started', '')}",
        "",
        f"- tiffin `{commit}`{dirty} · Python {env.get('python')} · grpcio "
        f"{packages.get('grpcio')} · onnxruntime {packages.get('onnxruntime')} · protobuf "
        f"{packages.get('protobuf')}"
        + (f" · {env['perf_analyzer']}" if "perf_analyzer" in env else ""),
        f"- pinning: servers and limit on cpu {run['pinning']['server_cpus']}, load on cpu "
        f"{run['pinning']['client_cpus']} · {env.get('cpu_model')}, {env.get('cpu_count')} cpus"
        f" · load average (1, 5, 15 min) {before} before, {after} after{peak}",
        f"- each point: {settings['warmup_s']:g} s warm-up, {settings['duration_s']:g} s "
        f"measured, batch-1 requests; streaming carries the load on {settings['streams']} "
        f"streams (perf_analyzer: one per concurrency slot); "
        + (
            "Tiffin's config.yaml: `max_batch_size: 64` + `dynamic_batching: {}` only "
            "(tiffin-tuned adds `kind: inline` and `intra_op_thread_count: 1`)"
            if settings.get("tiffin_config") == "user"
            else f"model instances: {settings['instance_kind']} × {settings['instance_count']}"
            f", max_queue_delay {settings['max_queue_delay_us']} µs"
        ),
        "- limit: best in-process items/s (Tiffin's onnxruntime backend, "
        + (
            "threads as the server chooses by default"
            if settings.get("default_threads")
            else "1 intra-op thread"
        )
        + ", server cpu); echo: the better echo server for the same client, mode and "
        "concurrency; ideal = 1 / (1/limit + 1/echo)",
    ]
    # The packages a peer's figure depends on most (the others are in run.json).
    shown = {
        "fastapi": ("fastapi", "uvicorn", "httptools"),
        "mlserver": ("mlserver", "grpcio"),
        "bentoml": ("bentoml",),
    }
    for peer, described in (env.get("peers") or {}).items():
        packages = described.get("packages") or {}
        names = (*shown.get(peer, ()), "onnxruntime")
        versions = ", ".join(f"{n} {packages.get(n)}" for n in names if packages.get(n))
        lines.append(f"- peer {peer}: {versions} (`{described.get('python')}`)")
    return lines + [""]


def _tiffin_tables(run: dict) -> list[str]:
    lines: list[str] = []
    derived = run.get("derived", [])
    tiffin = [r for r in run["results"] if r["target"] in TIFFIN_TARGETS and "concurrency" in r]
    for target, client in dict.fromkeys((r["target"], r["client"]) for r in tiffin):
        transport = " (REST)" if client == "rest" else ""
        lines += [f"## {TIFFIN_TARGETS[target]}, {client} client{transport}", ""]
        rows = []
        for r in (r for r in tiffin if (r["target"], r["client"]) == (target, client)):
            d: dict = next(
                (
                    d
                    for d in derived
                    if _same_point(d, r)
                    and d.get("target", target) == target
                    and d.get("round") == r.get("round")
                ),
                {},
            )
            rows.append(
                [
                    r["model"],
                    r["mode"],
                    _conc(r),
                    _n(r.get("throughput")),
                    _lat(r, "p50"),
                    _lat(r, "p90"),
                    _lat(r, "p99"),
                    _errors(r) if "skipped" not in r else "skipped",
                    _n(d.get("limit")),
                    _n(d.get("echo"))
                    + (" (lean)" if d.get("echo_client") not in (None, client) else ""),
                    _n(d.get("ideal")),
                    _n(d.get("ratio_limit"), 2),
                    _n(d.get("ratio_ideal"), 2),
                ]
            )
        lines += _table(
            [
                "model",
                "mode",
                "conc",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "errors",
                "limit items/s",
                "echo req/s",
                "ideal req/s",
                "÷ limit",
                "÷ ideal",
            ],
            rows,
        )
        failed = [
            r for r in tiffin if (r["target"], r["client"]) == (target, client) and "error" in r
        ]
        lines += [f"- {r['model']} {r['mode']} c={r['concurrency']}: {r['error']}" for r in failed]
        if failed:
            lines.append("")
    return lines


def _echo_table(run: dict) -> list[str]:
    echoes = [r for r in run["results"] if r["target"].startswith("echo-")]
    if not echoes:
        return []
    keys = dict.fromkeys(
        (r["model"], r["mode"], r["client"], r["concurrency"]) for r in echoes if "concurrency" in r
    )
    rows = []
    for model, mode, client, c in keys:
        row = [model, mode, client, str(c)]
        for target in ("echo-sync", "echo-aio"):
            r = next(
                (
                    r
                    for r in echoes
                    if r["target"] == target
                    and (r["model"], r["mode"], r["client"], r.get("concurrency"))
                    == (model, mode, client, c)
                ),
                None,
            )
            if r is None or "skipped" in r:
                row += ["–", "–"]
            else:
                row += [_n(r.get("throughput")), f"{_lat(r, 'p50')} / {_lat(r, 'p99')}"]
        if any(cell != "–" for cell in row[4:]):  # points skipped on both servers: see Notes
            rows.append(row)
    return ["## Transport ceiling: echo servers, no model", ""] + _table(
        [
            "model",
            "mode",
            "client",
            "conc",
            "sync req/s",
            "sync p50 / p99 ms",
            "aio req/s",
            "aio p50 / p99 ms",
        ],
        rows,
    )


def _limit_table(run: dict) -> list[str]:
    rows = []
    for model, limit in run.get("limit", {}).items():
        for b in limit["batches"]:
            best = b["batch"] == limit["best_batch"]
            figure = _n(b["items_per_s"])
            rows.append(
                [
                    model,
                    str(b["batch"]),
                    f"**{figure}**" if best else figure,
                    _n(b["latency_ms"]["p50"], 3),
                    _n(b["latency_ms"]["p99"], 3),
                ]
            )
    if not rows:
        return []
    return [f"## The limit: in-process, cpu {run['pinning']['server_cpus']}", ""] + _table(
        ["model", "batch", "items/s", "p50 ms", "p99 ms"], rows
    )


def _open_loop_table(run: dict) -> list[str]:
    points = [r for r in run["results"] if "rate" in r]
    if not points:
        return []
    rows = [
        [
            r["target"],
            r["model"],
            r["mode"],
            r["client"],
            _n(r["rate"]),
            _n(r.get("offered_rate")),
            _n(r.get("throughput")),
            _lat(r, "p50"),
            _lat(r, "p99"),
            _errors(r),
        ]
        for r in points
    ]
    return ["## Open loop (Poisson arrivals)", ""] + _table(
        [
            "target",
            "model",
            "mode",
            "client",
            "rate/s",
            "offered/s",
            "achieved/s",
            "p50 ms",
            "p99 ms",
            "errors",
        ],
        rows,
    )


def _bar(run: dict) -> list[str]:
    derived = [
        d
        for d in run.get("derived", [])
        if d["client"] not in ("tritonclient", "rest") and d.get("target", "tiffin") == "tiffin"
    ]
    if not derived:
        return []
    top = max(d["concurrency"] for d in derived)
    lines = ["## Against the bar (BENCHMARKS.md)", ""]
    for d in derived:
        where = f"{d['model']} {d['mode']} ({d['client']})"
        if "round" in d:
            where += f", round {d['round'] + 1}"
        if d["concurrency"] == top and d.get("ratio_ideal") is not None:
            ok = "meets" if d["ratio_ideal"] >= BAR_RATIO_IDEAL else "below"
            lines.append(
                f"- {where} c={top}: {d['ratio_ideal']:.2f} of ideal ({ok} {BAR_RATIO_IDEAL})"
            )
        if d["concurrency"] == 1 and d.get("p50_excess_ms") is not None:
            ok = "meets" if d["p50_excess_ms"] <= BAR_P50_SLACK_MS else "above"
            lines.append(
                f"- {where} c=1: p50 {d['p50_excess_ms']:+.3f} ms over batch-1 limit + "
                f"echo ({d['p50_floor_ms']:.3f} ms; {ok} the {BAR_P50_SLACK_MS} ms slack)"
            )
    return lines + [""]


def _point(col: dict) -> str:
    return f"{col['model']} c={col['concurrency']}"


def _cell(cell: dict) -> str:
    """A median, with the range of the rounds' figures where there were several."""
    if "rounds" not in cell:
        return _n(cell["throughput"])
    return f"{_n(cell['throughput'])} ({_n(min(cell['rounds']))}–{_n(max(cell['rounds']))})"


def _side_by_side_table(run: dict) -> list[str]:
    table = run.get("side_by_side") or side_by_side(run)
    if not table:
        return []
    columns, rows, references = table["columns"], table["rows"], table["references"]
    clients = dict.fromkeys(
        f"{row['label'].split(',')[0]} {c['client']}"
        for row in rows
        for c in row["cells"]
        if c["client"]
    )
    rounds = (run.get("settings") or {}).get("rounds") or 1
    lines = [
        "## Side by side: unary, batch-1 requests, closed loop, req/s"
        + (f", median of {rounds} rounds" if rounds > 1 else ""),
        "",
        f"Every server on cpu {run['pinning']['server_cpus']}, the load on cpu "
        f"{run['pinning']['client_cpus']}, in this run; clients: {', '.join(clients)}. Under "
        "each Tiffin row, its ratio to the in-process limit and to ideal.",
        "",
    ]
    body = []
    for row in rows:
        body.append([row["label"]] + [_cell(c) for c in row["cells"]])
        if row["target"].startswith("tiffin"):
            body.append(
                ["↳ ÷ limit / ÷ ideal"]
                + [
                    f"{_n(c.get('ratio_limit'), 2)} / {_n(c.get('ratio_ideal'), 2)}"
                    for c in row["cells"]
                ]
            )
    body.append(["in-process limit (items/s)"] + [_n(r["limit"]) for r in references])
    body.append(
        ["echo, no model (better of sync and aio, lean)"] + [_n(r["echo"]) for r in references]
    )
    body.append(["ideal = 1 / (1/limit + 1/echo)"] + [_n(r["ideal"]) for r in references])
    lines += _table(["server", *(_point(c) for c in columns)], body)
    labels = {row["target"]: row["label"].split(",")[0] for row in rows}
    for tiffin, name in (("tiffin", "Tiffin"), ("tiffin-tuned", "Tiffin hand-tuned")):
        verdict = table["verdicts"].get(f"{tiffin}_ahead_of_peers")
        if verdict is None:
            continue
        if verdict["ahead"]:
            lines.append(f"- {name} ahead of every peer at every point: **yes**")
        else:
            behind = "; ".join(
                f"{_point(b)} {labels.get(b['peer'], b['peer'])} {_n(b['peer_throughput'])} vs "
                f"{_n(b['tiffin'])}"
                for b in verdict["behind"]
            )
            lines.append(f"- {name} ahead of every peer at every point: **no**, behind at {behind}")
    verdict = table["verdicts"].get("default_vs_tuned")
    if verdict is not None:
        ratios = ", ".join(f"{_point(p)} {_n(p['ratio'], 2)}" for p in verdict["points"])
        answer = "yes" if verdict["within"] else "no"
        lines.append(
            f"- Tiffin as a user configures it within {1 - BAR_DEFAULT_VS_TUNED:.0%} of the "
            f"hand-tuned config at every point: **{answer}** (default ÷ tuned: {ratios})"
        )
    during = [r["load_1min"] for r in run.get("results", []) if r.get("load_1min") is not None]
    cpus = (run.get("environment") or {}).get("cpu_count")
    if during and cpus and max(during) > cpus:
        lines.append(
            f"- the 1-minute load average reached {max(during)} on {cpus} cpus during the "
            "points: other work shared the cores, so small differences between rows (the 5% "
            "above among them) are within noise here; repeat on a quiet machine to judge them"
        )
    for model, choice in (run.get("served_choices") or {}).get("tiffin", {}).items():
        said = "; ".join(
            f"{key}: {choice[key]}"
            for key in ("instance_choice", "thread_defaults")
            if key in choice
        )
        if said:
            lines.append(f"- Tiffin's choices for {model} (the config a user writes): {said}")
    return lines + [""]


def _peer_table(run: dict) -> list[str]:
    points = [r for r in run["results"] if _is_peer(r["target"]) and "concurrency" in r]
    if not points:
        return []
    rows = [
        [
            r["target"],
            r["model"],
            r["mode"],
            r["client"],
            _conc(r),
            _n(r.get("throughput")),
            _lat(r, "p50"),
            _lat(r, "p90"),
            _lat(r, "p99"),
            _errors(r),
        ]
        for r in points
    ]
    header = ["peer", "model", "mode", "client", "conc", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    return ["## Peers", ""] + _table([*header, "errors"], rows)


def markdown(run: dict) -> str:
    lines = _header(run) + _side_by_side_table(run) + _tiffin_tables(run) + _peer_table(run)
    lines += _echo_table(run) + _limit_table(run)
    lines += _open_loop_table(run) + _bar(run)
    skipped = [r for r in run["results"] if "skipped" in r]
    notes = list(run.get("notes", []))
    if skipped:
        reasons = dict.fromkeys(r["skipped"].removeprefix("skipped: ") for r in skipped)
        notes.append(f"{len(skipped)} point(s) skipped: " + "; ".join(reasons))
    failed = [r for r in run["results"] if "error" in r and r["target"] not in TIFFIN_TARGETS]
    notes += [
        f"{r['target']} {r['model']} {r['mode']} {r['client']} "
        f"c={r.get('concurrency')}: {r['error']}"
        for r in failed
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# ---- files -------------------------------------------------------------------------------


def write_all(run: dict, out: Path) -> dict[str, Path]:
    """Writes run.json, results.md and results.png into `out`; returns their paths."""
    from .plot import plot

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "run.json", "markdown": out / "results.md", "plot": out / "results.png"}
    run = _finite(run)
    paths["json"].write_text(json.dumps(run, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(run))
    plot(run, paths["plot"])
    return paths
