"""`--trace-config`, spelt as Triton's: what tracing does, read without importing OpenTelemetry.

Each item is `KEY=VALUE` or `opentelemetry,KEY=VALUE` (Triton's prefix for the exporter's
settings). In TIFFIN_TRACE_CONFIG the items are comma-separated, which splits
`opentelemetry,url=...` in two: a bare `opentelemetry` item is therefore ignored, and the
exporter's keys are taken with or without their prefix (no key means two things).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

TRITON_DEFAULT_RATE = 1000  # Triton's: one request in 1000 is traced
GLOBAL_KEYS = ("mode", "rate", "level")
EXPORTER_KEYS = (
    "url",
    "resource",
    "bsp_max_queue_size",
    "bsp_schedule_delay",
    "bsp_max_export_batch_size",
)


@dataclass(frozen=True)
class TraceConfig:
    """What --trace-config asked for; `enabled` is False unless mode=opentelemetry."""

    enabled: bool = False
    rate: int = TRITON_DEFAULT_RATE
    # OTLP/gRPC endpoint as the exporter takes it (http:// plain, https:// TLS); "" leaves
    # it to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT.
    url: str = ""
    resource: dict[str, str] = field(default_factory=dict)
    max_queue_size: int = 2048  # the BatchSpanProcessor's defaults (Triton's too)
    schedule_delay_ms: int = 5000
    max_export_batch_size: int = 512


def parse_trace_config(items: tuple[str, ...] | list[str]) -> TraceConfig:
    """The settings the items give; ValueError with a sentence naming the item otherwise
    (the caller names the flag)."""
    values: dict[str, str] = {}
    resource: dict[str, str] = {}
    for item in items:
        text = item.strip()
        if text in ("opentelemetry", ""):
            continue  # the prefix, split from its key by TIFFIN_TRACE_CONFIG's commas
        key, separator, value = text.removeprefix("opentelemetry,").partition("=")
        key = key.strip()
        if not separator or key not in (*GLOBAL_KEYS, *EXPORTER_KEYS):
            known = ", ".join([*GLOBAL_KEYS, *(f"opentelemetry,{k}" for k in EXPORTER_KEYS)])
            raise ValueError(f"'{item}' is not understood; give KEY=VALUE with KEY one of {known}")
        if key == "resource":
            name, eq, attribute = value.partition("=")
            if not eq or not name:
                raise ValueError(f"'{item}' must be opentelemetry,resource=NAME=VALUE")
            resource[name] = attribute
        else:
            values[key] = value.strip()
    mode = values.get("mode", "").lower()
    if mode and mode != "opentelemetry":
        raise ValueError(
            f"mode={values['mode']} is not offered; Tiffin traces with "
            "mode=opentelemetry (OTLP over gRPC)"
        )
    level = values.get("level", "TIMESTAMPS").upper()
    if level not in ("OFF", "TIMESTAMPS"):
        raise ValueError(
            f"level={values['level']} is not offered; give TIMESTAMPS (spans "
            "with their times) or OFF (tensors are never traced)"
        )
    return TraceConfig(
        enabled=mode == "opentelemetry" and level != "OFF",
        rate=_positive(values, "rate", TRITON_DEFAULT_RATE),
        url=_endpoint(values.get("url", "")),
        resource=resource,
        max_queue_size=_positive(values, "bsp_max_queue_size", 2048),
        schedule_delay_ms=_positive(values, "bsp_schedule_delay", 5000),
        max_export_batch_size=_positive(values, "bsp_max_export_batch_size", 512),
    )


def _positive(values: dict[str, str], key: str, default: int) -> int:
    text = values.get(key)
    if text is None:
        return default
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{key}={text} must be a whole number of at least 1")
    return number


def _endpoint(url: str) -> str:
    """HOST:PORT as the OTLP exporter takes it: plain text to a loopback collector, TLS to
    any other (http:// or https:// given explicitly are kept)."""
    if not url or url.startswith(("http://", "https://")):
        return url
    host, colon, port = url.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(
            f"opentelemetry,url={url} must be HOST:PORT (or http://HOST:PORT "
            "for plain text, https://HOST:PORT for TLS)"
        )
    return ("http://" if _loopback(host.strip("[]")) else "https://") + url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
