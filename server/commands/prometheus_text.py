"""Reading Prometheus' text exposition format, and histogram_quantile over its buckets.

Small on purpose: `serverctl status` needs the samples (name, labels, value) of a few
metrics, so comments, `# HELP`/`# TYPE` lines, timestamps and lines it cannot read are
passed over; prometheus_client is not a dependency of Tiffin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import NamedTuple

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*\"")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class Sample(NamedTuple):
    """One line of the exposition: `name{labels} value`."""

    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """The samples of an exposition text; lines that are not samples are left out."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sample = parse_line(line)
        if sample is not None:
            samples.append(sample)
    return samples


def parse_line(line: str) -> Sample | None:
    """`name{a="1",b="x\\"y"} 1.5 [timestamp]` as a Sample; None when it is not one."""
    match = _NAME.match(line)
    if match is None:
        return None
    name, at = match.group(), match.end()
    labels: dict[str, str] = {}
    rest = line[at:].lstrip(" \t")  # blanks may come before the `{`
    if rest.startswith("{"):
        read = _labels(line, len(line) - len(rest) + 1)
        if read is None:
            return None
        labels, at = read
    fields = line[at:].split()
    if not fields or len(fields) > 2 or (at < len(line) and not line[at].isspace()):
        return None
    try:
        # float() reads the format's NaN, +Inf and -Inf as they are spelled.
        value = float(fields[0])
    except ValueError:
        return None
    return Sample(name, labels, value)


def _labels(line: str, at: int) -> tuple[dict[str, str], int] | None:
    """The labels from just after `{` to the closing `}`, and where the rest begins."""
    labels: dict[str, str] = {}
    while True:
        while at < len(line) and line[at] in " \t":
            at += 1
        if at < len(line) and line[at] == "}":
            return labels, at + 1
        match = _LABEL_NAME.match(line, at)
        if match is None:
            return None
        at = match.end()
        value: list[str] = []
        while at < len(line) and line[at] != '"':
            if line[at] == "\\" and at + 1 < len(line):
                at += 1
                value.append(_ESCAPES.get(line[at], "\\" + line[at]))
            else:
                value.append(line[at])
            at += 1
        if at >= len(line):
            return None  # the value's closing quote is missing
        labels[match.group(1)] = "".join(value)
        at += 1
        while at < len(line) and line[at] in " \t":
            at += 1
        if at < len(line) and line[at] == ",":
            at += 1


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile (0 to 1) from cumulative `(upper bound, count)` buckets, interpolated
    linearly within its bucket as Prometheus' histogram_quantile does; None without
    observations (Prometheus' NaN) or without a +Inf bucket."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][0] != math.inf:
        return None
    # Counts read from concurrent scrapes may dip; cumulative counts never do.
    bounds = [bound for bound, _ in ordered]
    counts: list[float] = []
    for _, count in ordered:
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    # The first bucket holding the rank; past every finite bound the answer is the last one.
    b = next((i for i, count in enumerate(counts[:-1]) if count >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2] if len(bounds) > 1 else None
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count <= 0:
        return end  # q = 0 with an empty first bucket
    return start + (end - start) * (rank / count)
