"""The figures of an overload run, from every request's record: overload.json and overload.md.

A request belongs to the phase of its scheduled time. It is *good* when it succeeded within its
deadline, counted from that scheduled time; goodput is good requests per second of the phase.
Latencies also count from the scheduled time (what the caller waits); *lag* is how late the
generator sent it. Refused means RESOURCE_EXHAUSTED or UNAVAILABLE: the server said no. Other
codes are counted by name with their latency: under load grpc itself may end calls with a bare
CANCELLED within milliseconds, a refusal in all but name.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import _finite, _n, _table

# BENCHMARKS.md: "Under overload (open loop at 2x capacity, 1 s client deadlines) goodput stays
# at least 0.8 of capacity", and admitted requests answered within their deadline.
TARGET_GOODPUT_RATIO = 0.8
STATUSES = ("OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
REFUSED = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
NOT_SENT = "NOT_SENT"  # the generator was a whole deadline late: it did not send
LAG_BUDGET_MS = 10.0  # p99 lag beyond this: the generator did not keep its schedule
BIN_S = 0.25  # timeline resolution, by scheduled time
RECOVERED_FRACTION = 0.95  # a window is recovered when this share of its offer is good
RECOVERY_HOLD_S = 1.0  # ... and stays so for this long


@dataclass(frozen=True)
class Phase:
    """A stretch of constant offered load."""

    name: str
    load: float  # x capacity
    rate: float  # arrivals per second
    start_s: float  # from the start of the first phase
    duration_s: float


@dataclass
class Records:
    """One entry per request: scheduled, sent and finished times (s), and the outcome."""

    scheduled: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)


def _quantiles(values: list[float]) -> dict | None:
    """Nearest-rank p50 and p99, and the max, in ms."""
    if not values:
        return None
    ms = sorted(v * 1e3 for v in values)

    def rank(q: float) -> float:
        return ms[max(1, math.ceil(q / 100 * len(ms))) - 1]

    return {"p50": rank(50), "p99": rank(99), "max": ms[-1]}


def _bucket(code: str) -> str:
    if code in STATUSES:
        return code
    return "not_sent" if code == NOT_SENT else "other"


def recovery_time(bins: list[dict]) -> float | None:
    """Seconds from the start of the phase to the first window from which, for
    RECOVERY_HOLD_S, at least RECOVERED_FRACTION of the offered requests were good; None if
    that never happened."""
    hold = min(len(bins), max(1, round(RECOVERY_HOLD_S / BIN_S)))
    for i in range(len(bins) - hold + 1):
        if all(b["good"] >= RECOVERED_FRACTION * b["offered"] for b in bins[i : i + hold]):
            return i * BIN_S
    return None


def _phase(records: Records, phase: Phase, capacity: float, deadline_s: float) -> dict:
    end = phase.start_s + phase.duration_s
    counts: Counter[str] = Counter({k: 0 for k in (*STATUSES, "other", "not_sent")})
    other: Counter[str] = Counter()
    admitted, refused, expired, lag = [], [], [], []
    by_code: dict[str, list[float]] = {}
    bins = [
        {"t": round(i * BIN_S, 6), "offered": 0, "good": 0, "refused": 0, "expired": 0}
        for i in range(math.ceil(phase.duration_s / BIN_S))
    ]
    good = ok_late = 0
    for scheduled, sent, done, code in zip(
        records.scheduled, records.sent, records.done, records.codes, strict=True
    ):
        if not phase.start_s <= scheduled < end:
            continue
        bucket = _bucket(code)
        counts[bucket] += 1
        if bucket == "other":
            other[code] += 1
        waited = done - scheduled
        by_code.setdefault(code, []).append(waited)
        lag.append(sent - scheduled)
        b = bins[min(len(bins) - 1, int((scheduled - phase.start_s) / BIN_S))]
        b["offered"] += 1
        if code == "OK":
            admitted.append(waited)
            if waited <= deadline_s:
                good += 1
                b["good"] += 1
            else:
                ok_late += 1
        elif code in REFUSED:
            refused.append(waited)
            b["refused"] += 1
        elif code == "DEADLINE_EXCEEDED":
            expired.append(waited)
            b["expired"] += 1
    offered = sum(counts.values())
    lag_ms = _quantiles(lag)
    result: dict[str, Any] = {
        "load": phase.load,
        "rate": phase.rate,
        "start_s": phase.start_s,
        "duration_s": phase.duration_s,
        "offered": offered,
        "offered_rate": offered / phase.duration_s,
        "good": good,
        "goodput": good / phase.duration_s,
        "goodput_ratio": good / phase.duration_s / capacity,
        "counts": dict(counts),
        "other_codes": dict(other),
        "ok_late": ok_late,
        "admitted_ms": _quantiles(admitted),
        "refused_ms": _quantiles(refused),
        "deadline_exceeded_ms": _quantiles(expired),
        "by_code_ms": {code: _quantiles(values) for code, values in sorted(by_code.items())},
        "lag_ms": lag_ms,
        "kept_schedule": counts["not_sent"] == 0
        and (lag_ms is None or lag_ms["p99"] <= LAG_BUDGET_MS),
        "timeline": bins,
    }
    if phase.name == "recovery":
        result["recovery_s"] = recovery_time(bins)
    return result


def summarise(
    records: Records, phases: list[Phase], capacity: float, deadline_s: float, rows: int | None
) -> dict:
    """The phases' figures, the server's wasted work and the verdict against the target.

    `rows` is how many batch rows the server ran during the open loop (None if unknown)."""
    figures = {p.name: _phase(records, p, capacity, deadline_s) for p in phases}
    good = sum(f["good"] for f in figures.values())
    server_work = None
    if rows is not None:
        server_work = {
            "rows_executed": rows,
            "answered_in_time": good,
            "wasted_fraction": 1 - good / rows if rows else None,
        }
    over = figures[phases[0].name]
    p99 = (over["admitted_ms"] or {}).get("p99")
    goodput_ok = over["goodput_ratio"] >= TARGET_GOODPUT_RATIO
    p99_ok = p99 is not None and p99 < deadline_s * 1e3
    return {
        "phases": figures,
        "server_work": server_work,
        "target": {
            "goodput_ratio_min": TARGET_GOODPUT_RATIO,
            "admitted_p99_max_ms": deadline_s * 1e3,
            "goodput_ratio": over["goodput_ratio"],
            "admitted_p99_ms": p99,
            "goodput_ok": goodput_ok,
            "admitted_p99_ok": p99_ok,
            "pass": goodput_ok and p99_ok,
            "generator_kept_schedule": all(f["kept_schedule"] for f in figures.values()),
        },
    }


# ---- markdown ----------------------------------------------------------------------------


def _pair(q: dict | None, digits: int = 1) -> str:
    return f"{_n(q['p50'], digits)} / {_n(q['p99'], digits)}" if q else "–"


def verdict(run: dict) -> str:
    """One line: PASS or FAIL against the target, with the figures it was judged on."""
    target, settings = run["target"], run["settings"]
    word = "PASS" if target["pass"] else "FAIL"
    line = (
        f"**{word}** at {settings['overload']:g}x capacity, {settings['deadline_ms']:g} ms "
        f"deadlines: goodput {target['goodput_ratio']:.2f} x capacity (target >= "
        f"{target['goodput_ratio_min']:g}: {'met' if target['goodput_ok'] else 'missed'}), "
        f"admitted p99 {_n(target['admitted_p99_ms'])} ms (target < "
        f"{target['admitted_p99_max_ms']:g} ms: "
        f"{'met' if target['admitted_p99_ok'] else 'missed'})"
    )
    recovery = run["phases"].get("recovery")
    if recovery is not None:
        r = recovery["recovery_s"]
        line += "; recovery " + (
            f"{r:g} s after the drop" if r is not None else "not within the recovery phase"
        )
    if not target["generator_kept_schedule"]:
        late = "; ".join(
            f"{name}: lag p99 {_n((f['lag_ms'] or {}).get('p99'))} ms, "
            f"{f['counts']['not_sent']:,} not sent"
            for name, f in run["phases"].items()
            if not f["kept_schedule"]
        )
        line += (
            f" — but the generator did not keep its schedule ({late}; budget: p99 "
            f"{LAG_BUDGET_MS:g} ms, none unsent), so it, not only the server, set these figures"
        )
    return line


def markdown(run: dict) -> str:
    env, settings, capacity = run["environment"], run["settings"], run.get("capacity") or {}
    packages = env.get("packages", {})
    commit = (env.get("tiffin_commit") or "unknown")[:10]
    dirty = " + uncommitted changes" if env.get("tiffin_dirty") else ""
    load = run.get("load_average", {})
    source = env.get("tiffin_imported_from")
    here = Path(__file__).resolve().parent.parent / "server"
    where = f" (but the server ran from {source})" if source and Path(source) != here else ""
    lines = [
        f"# Tiffin overload benchmark, {run.get('started', '')}",
        "",
        f"- tiffin `{commit}`{dirty}{where} · Python {env.get('python')} · grpcio "
        f"{packages.get('grpcio')} · onnxruntime {packages.get('onnxruntime')}",
        f"- pinning: server on cpu {run['pinning']['server_cpus']}, load on cpu "
        f"{run['pinning']['client_cpus']} · {env.get('cpu_model')}, {env.get('cpu_count')} cpus "
        f"· load average (1, 5, 15 min) {load.get('before')} before, {load.get('after')} after",
        f"- model {settings['model']}, instances {settings['instance_kind']} × "
        f"{settings['instance_count']}, max_queue_delay {settings['max_queue_delay_us']} µs; "
        f"generator: {settings['generator_processes']} process(es), {settings['generator']}",
    ]
    if capacity.get("measured"):
        lat = capacity["load"].get("latency_ms") or {}
        lines.append(
            f"- capacity {_n(capacity['req_per_s'])} req/s: closed loop, "
            f"{settings['capacity_concurrency']} clients, {settings['capacity_seconds']:g} s "
            f"after {settings['capacity_warmup_s']:g} s warm-up (p99 {_n(lat.get('p99'), 1)} ms)"
        )
    elif capacity:
        lines.append(f"- capacity {_n(capacity['req_per_s'])} req/s, given (not measured)")
    lines += [
        f"- open loop, Poisson arrivals, each request with a {settings['deadline_ms']:g} ms "
        "deadline from its scheduled time; latencies count from that time; good = OK within "
        "the deadline; refused = RESOURCE_EXHAUSTED or UNAVAILABLE",
        "",
    ]
    phases = run.get("phases") or {}
    if phases:
        rows = []
        for name, f in phases.items():
            c = f["counts"]
            lag = f["lag_ms"]
            recovery = f.get("recovery_s", "")
            rows.append(
                [
                    name,
                    f"{f['load']:g}x, {f['duration_s']:g} s",
                    _n(f["offered_rate"]),
                    _n(f["goodput"]),
                    _n(f["goodput_ratio"], 2),
                    *(_n(c[k]) for k in (*STATUSES, "other", "not_sent")),
                    _pair(f["admitted_ms"]),
                    _pair(f["refused_ms"]),
                    _pair(f["deadline_exceeded_ms"]),
                    f"{_n(lag['p99'], 1)} / {_n(lag['max'], 1)}" if lag else "–",
                    "–" if recovery is None else (f"{recovery:g}" if recovery != "" else ""),
                ]
            )
        lines += _table(
            [
                "phase",
                "load",
                "offered/s",
                "goodput/s",
                "÷ capacity",
                "OK",
                "RESOURCE_EXHAUSTED",
                "UNAVAILABLE",
                "DEADLINE_EXCEEDED",
                "other",
                "not sent",
                "admitted p50 / p99 ms",
                "refused p50 / p99 ms",
                "expired p50 / p99 ms",
                "lag p99 / max ms",
                "recovery s",
            ],
            rows,
        )
        for name, f in phases.items():
            for code, count in sorted(f["other_codes"].items()):
                q = f["by_code_ms"].get(code)
                lines.append(f"- {name}, other: {code} {count:,} (p50 / p99 {_pair(q)} ms)")
            if f["ok_late"]:
                lines.append(f"- {name}: {f['ok_late']} OK answers arrived after the deadline")
    generator = run.get("generator")
    if generator:
        busy = ", ".join(_n(b, 2) for b in generator["cpu_busy"])
        lines.append(
            f"- generator cpu: {busy} of a core per process over the open loop (near 1: the "
            "generator, not the server, may have set the pace)"
        )
        examples = generator["failure_examples"]
        lines += [f"- e.g. {examples[code]}" for code in sorted(examples)]
    work = run.get("server_work")
    if work and work["wasted_fraction"] is not None:
        lines.append(
            f"- server work during the open loop: {work['rows_executed']:,} rows run, "
            f"{work['answered_in_time']:,} answered in time; {work['wasted_fraction']:.0%} of "
            "the work was for callers that had given up or were never answered in time"
            + ("" if work.get("settled", True) else " (the server was still working)")
        )
    if "target" in run:
        lines += ["", "## Against the target (BENCHMARKS.md)", "", "- " + verdict(run)]
    if run.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run["notes"]]
    return "\n".join(lines) + "\n"


def write_all(run: dict, out: Path) -> dict[str, Path]:
    """Writes overload.json and overload.md into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "overload.json", "markdown": out / "overload.md"}
    run = _finite(run)
    paths["json"].write_text(json.dumps(run, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(run))
    return paths
