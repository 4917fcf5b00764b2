"""results.png: throughput against p99 latency, one line per configuration, one panel per model.

A configuration is server x mode x client; its points are the concurrencies, labelled. The
colour says mode and client; Tiffin is drawn solid, the echo servers dotted (sync) and dashed
(aio), the limit as a horizontal line.
"""

from __future__ import annotations

from pathlib import Path

STYLES = {
    "tiffin": "-",
    "tiffin-nohttp": "-.",
    "tiffin-nometrics": "-",  # a format string, so a plain line; its colour tells it apart
    "echo-sync": ":",
    "echo-aio": "--",
}
# Servers other than Tiffin's default and the echo servers: a colour of their own, whatever
# the client, so that they stand apart from Tiffin's lines.
TARGET_COLOURS = {
    "tiffin-tuned": "navy",
    "fastapi": "tab:brown",
    "mlserver": "tab:pink",
    "bentoml": "tab:olive",
}
COLOURS = {  # (mode, client) -> colour, so that a server's line matches its echo's
    ("unary", "lean"): "tab:blue",
    ("streaming", "lean"): "tab:orange",
    ("unary", "tritonclient"): "tab:cyan",
    ("streaming", "tritonclient"): "tab:olive",
    ("unary", "perf_analyzer"): "tab:green",
    ("unary_async", "perf_analyzer"): "tab:red",
    ("streaming", "perf_analyzer"): "tab:purple",
}


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    closed = [
        r
        for r in run["results"]
        if "concurrency" in r and r.get("throughput") and (r.get("latency_ms") or {}).get("p99")
    ]
    models = list(dict.fromkeys(run["settings"]["models"]))
    fig, axes = plt.subplots(
        1, max(1, len(models)), figsize=(7 * max(1, len(models)), 5.5), squeeze=False
    )
    for ax, model in zip(axes[0], models, strict=False):
        points = [r for r in closed if r["model"] == model]
        configs = dict.fromkeys((r["target"], r["mode"], r["client"]) for r in points)
        for target, mode, client in configs:
            config = (target, mode, client)
            line = sorted(
                (r for r in points if (r["target"], r["mode"], r["client"]) == config),
                key=lambda r: r["concurrency"],
            )
            xs = [r["latency_ms"]["p99"] for r in line]
            ys = [r["throughput"] for r in line]
            ax.plot(
                xs,
                ys,
                STYLES.get(target, "-"),
                color=TARGET_COLOURS.get(target) or COLOURS.get((mode, client), "tab:gray"),
                marker="o",
                markersize=3,
                label=f"{target} {mode} {client}",
            )
            for r, x, y in zip(line, xs, ys, strict=True):
                ax.annotate(
                    str(r["concurrency"]),
                    (x, y),
                    fontsize=6,
                    xytext=(2, 2),
                    textcoords="offset points",
                )
        limit = run.get("limit", {}).get(model, {}).get("best_items_per_s")
        if limit:
            ax.axhline(limit, color="black", linewidth=0.8, label=f"limit {limit:,.0f} items/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (req/s)")
        ax.set_title(
            f"{model}: server cpu {run['pinning']['server_cpus']}, "
            f"load cpu {run['pinning']['client_cpus']}"
        )
        ax.grid(True, which="both", linewidth=0.3)
        if points or limit:
            ax.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.suptitle(
        f"Tiffin benchmark {run.get('started', '')} "
        f"({(run['environment'].get('tiffin_commit') or '')[:10]})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
