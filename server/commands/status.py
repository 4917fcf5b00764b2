"""`serverctl status`: a live table of a running server's model versions and their figures.

States come from the gRPC repository index (so TLS and tokens work as for every admin verb);
the figures from two scrapes of the Prometheus endpoint `--interval` seconds apart, computed
as PromQL would over that window: `rate()` of the request counters, `histogram_quantile()`
over the latency buckets' increase, the batch-size histogram's sum over its count, and the
queue depth and drift score as the last scrape saw them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from tiffin.clients import InferenceClient
from tiffin.clients.client import InferenceServerError

from ..settings import SettingsError
from .prometheus_text import Sample, histogram_quantile, parse
from .remote import add_remote_arguments, client_from_arguments, print_json

HELP = "Watch a running server: per model version, state, req/s, latency, batches and errors."

COLUMNS = (
    "model version state req/s p50 p99 batch queue errors/s drift"
).split()  # batch: mean rows per execution; drift: the largest PSI of a feature
METRICS_PORT = 8002
Key = tuple[tuple[str, str], ...]  # a sample's labels, sorted


@dataclass
class Row:
    """One model version's figures over the last interval (None: nothing to show)."""

    model: str
    version: str
    state: str
    requests_per_second: float | None = None
    p50_seconds: float | None = None
    p99_seconds: float | None = None
    mean_batch_size: float | None = None
    queue_depth: int | None = None
    errors_per_second: float | None = None
    drift_score: float | None = None


class Scrape:
    """One read of the metrics endpoint: samples by name, and when it was read."""

    def __init__(self, samples: list[Sample], at: float) -> None:
        self.at = at
        self.by_name: dict[str, list[Sample]] = {}
        for sample in samples:
            self.by_name.setdefault(sample.name, []).append(sample)

    def of(self, name: str, model: str, version: str) -> list[Sample]:
        """The samples of `name` labelled with this model version."""
        return [
            s
            for s in self.by_name.get(name, ())
            if s.labels.get("model") == model and s.labels.get("version") == version
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote_arguments(parser)
    parser.add_argument(
        "--metrics-url",
        default=os.environ.get("TIFFIN_METRICS_URL"),
        help="The server's Prometheus endpoint [env TIFFIN_METRICS_URL] "
        f"(default: http://HOST:{METRICS_PORT}/metrics, HOST as in --url).",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="Seconds between scrapes; each figure covers one interval (default: %(default)s).",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="Print one table (or, with --json, the rows) after one interval, and stop.",
    )


def run(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise SettingsError(f"--interval must be more than 0 seconds, not {args.interval:g}.")
    if args.json and not args.once:
        raise SettingsError("--json prints one set of rows: it needs --once.")
    metrics_url = args.metrics_url or default_metrics_url(args.url)
    if urlsplit(metrics_url).scheme not in ("http", "https"):
        raise SettingsError(f"--metrics-url {metrics_url} is not an http:// or https:// URL.")
    with client_from_arguments(args) as client:
        states = read_states(client, args.url)  # a server that is not there fails first
        before = scrape(metrics_url, args.timeout)
        if args.once:
            time.sleep(args.interval)
            rows = figures(read_states(client, args.url), before, scrape(metrics_url, args.timeout))
            if args.json:
                print_json([asdict(row) for row in rows])
            else:
                _print(_table(_title(args.url, args.interval), rows))
            return 0
        return _watch(args, client, metrics_url, states, before)


def _watch(
    args: argparse.Namespace,
    client: InferenceClient,
    metrics_url: str,
    states: list[tuple[str, str, str]],
    before: Scrape,
) -> int:
    """The table refreshed in place every interval, until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    title = _title(args.url, args.interval)
    first = [Row(model, version, state) for model, version, state in states]
    try:
        waiting = f"measuring the first {args.interval:g} s; Ctrl-C to stop"
        with Live(_table(title, first, waiting), console=Console(), auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                after = scrape(metrics_url, args.timeout)
                rows = figures(read_states(client, args.url), before, after)
                caption = f"updated {time.strftime('%H:%M:%S')}; Ctrl-C to stop"
                live.update(_table(title, rows, caption), refresh=True)
                before = after
    except KeyboardInterrupt:
        return 0  # the way to stop watching, not an error


def _print(table: Any) -> None:
    from rich.console import Console

    # Piped, rich would wrap at 80 columns; a script reading it wants whole lines.
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)


def _title(url: str, interval: float) -> str:
    return f"models on {url}, over {interval:g} s"


def _table(title: str, rows: list[Row], caption: str | None = None) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "state") else "right")
    for row in rows:
        table.add_row(*cells(row))
    return table


def default_metrics_url(url: str) -> str:
    """The metrics endpoint on the gRPC address's host, on Triton's metrics port."""
    host = urlsplit(f"//{url}").hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{METRICS_PORT}/metrics"


def read_states(client: InferenceClient, url: str) -> list[tuple[str, str, str]]:
    """(model, version, state) of every entry of the repository index, in order."""
    try:
        index = client.repository_index()
    except InferenceServerError as exc:
        message = exc.message.rstrip(".")
        raise RuntimeError(
            f"cannot read the repository index from {url}: [{exc.code.name}] {message}."
        ) from None
    entries = [(m.name, m.version, m.state) for m in index]
    return sorted(entries, key=lambda e: (e[0], int(e[1]) if e[1].isdigit() else -1, e[1]))


def scrape(url: str, timeout: float) -> Scrape:
    """Reads the metrics endpoint; a sentence naming the URL when it cannot."""
    at = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the metrics endpoint {url} answered HTTP {exc.code}.") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise RuntimeError(
            f"cannot read metrics from {url}: {reason} (is the server serving metrics? "
            "--metrics-url names the endpoint)."
        ) from None
    return Scrape(parse(text), at)


def figures(states: list[tuple[str, str, str]], before: Scrape, after: Scrape) -> list[Row]:
    """Each model version's row over the interval between two scrapes."""
    return [_row(Row(*state), before, after) for state in states]


def _row(row: Row, before: Scrape, after: Scrape) -> Row:
    if not row.version:
        return row  # a model without versions (its folder is unusable): a state only
    seconds = max(after.at - before.at, 1e-9)

    def grown(name: str, keep: Callable[[Sample], bool] = lambda s: True) -> dict[Key, float]:
        return increase(before, after, name, row.model, row.version, keep)

    def now(name: str) -> list[Sample]:
        return [s for s in after.of(name, row.model, row.version) if not math.isnan(s.value)]

    requests = grown("tiffin_requests_total")
    if requests:
        row.requests_per_second = sum(requests.values()) / seconds
        row.errors_per_second = sum(grown("tiffin_requests_total", _failed).values()) / seconds
    elif now("tiffin_execution_count_total"):
        row.requests_per_second = row.errors_per_second = 0.0  # serving, none asked yet
    by_bound: dict[float, float] = {}
    for labels, count in grown("tiffin_request_duration_seconds_bucket").items():
        bound = _bound(dict(labels).get("le", ""))
        if bound is not None:
            by_bound[bound] = by_bound.get(bound, 0.0) + count
    row.p50_seconds = histogram_quantile(0.5, by_bound.items())
    row.p99_seconds = histogram_quantile(0.99, by_bound.items())
    batches = sum(grown("tiffin_batch_size_count").values())
    if batches > 0:
        row.mean_batch_size = sum(grown("tiffin_batch_size_sum").values()) / batches
    # The gauges are what the last scrape saw; a version the server keeps no figures
    # for (not serving) has none, rather than a zero.
    if now("tiffin_requests_in_flight") or now("tiffin_queue_depth"):
        row.queue_depth = int(sum(s.value for s in now("tiffin_queue_depth")))
    drift = [s.value for s in now("tiffin_drift_score") if s.labels.get("method") == "psi"]
    row.drift_score = max(drift) if drift else None
    return row


def increase(
    before: Scrape,
    after: Scrape,
    name: str,
    model: str,
    version: str,
    keep: Callable[[Sample], bool] = lambda s: True,
) -> dict[Key, float]:
    """Per label set, how much the counter `name` of a model version grew between scrapes."""
    was = {_key(s): s.value for s in before.of(name, model, version) if keep(s)}
    return {
        _key(s): _grown(was.get(_key(s), 0.0), s.value)
        for s in after.of(name, model, version)
        if keep(s)
    }


def _failed(sample: Sample) -> bool:
    return sample.labels.get("status") != "OK"


def _key(sample: Sample) -> Key:
    return tuple(sorted(sample.labels.items()))


def _grown(was: float, now: float) -> float:
    """A counter's increase; one that went down was reset (the server restarted)."""
    return now - was if now >= was else now


def _bound(le: str) -> float | None:
    try:
        return float(le)
    except ValueError:
        return None


def cells(row: Row) -> list[str]:
    """A row as the table shows it: "-" where there is nothing to show."""
    return [
        row.model,
        row.version or "-",
        row.state,
        _number(row.requests_per_second),
        _duration(row.p50_seconds),
        _duration(row.p99_seconds),
        _number(row.mean_batch_size),
        "-" if row.queue_depth is None else str(row.queue_depth),
        _number(row.errors_per_second),
        "-" if row.drift_score is None else f"{row.drift_score:.3f}",
    ]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
