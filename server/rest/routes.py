"""Which operation a REST path names: Triton's URL patterns (src/http_server.cc), one table.

Paths are matched on their raw (still percent-encoded) form, segment by segment, and each
segment is decoded afterwards, so an encoded `/` in a model name never makes a new segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_MODEL = re.compile(
    r"/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(infer|ready|config|stats|trace/setting))?"
)
_HEALTH = re.compile(r"/v2/health/(live|ready)")
_REPOSITORY = re.compile(r"/v2/repository(?:/([^/]+))?/(?:(index)|models/([^/]+)/(load|unload))")
# Triton's extensions that Tiffin does not offer: answered 501, as gRPC answers UNIMPLEMENTED.
_NOT_OFFERED = (
    (
        re.compile(r"/v2/(system|cuda)sharedmemory(?:/region/[^/]+)?/(status|register|unregister)"),
        "shared memory",
    ),
    (re.compile(r"/v2/trace/setting"), "trace settings"),
    (re.compile(r"/v2/logging"), "log settings"),
)

# The data plane operation of each route, and the HTTP method it takes.
METHODS = {
    "live": "GET",
    "ready": "GET",
    "server_metadata": "GET",
    "model_ready": "GET",
    "model_metadata": "GET",
    "model_config": "GET",
    "statistics": "GET",
    "infer": "POST",
    "repository_index": "POST",
    "load": "POST",
    "unload": "POST",
}


@dataclass(frozen=True, slots=True)
class Route:
    """What a path asks for: the data plane `operation` and the names in the path.

    `operation` is "" for a path that names nothing here; `not_offered` names a Triton
    feature this server does not offer (the operation is then "")."""

    operation: str
    model: str = ""
    version: str = ""
    repository: str = ""
    not_offered: str = ""


_NOTHING = Route("")
_MODEL_KINDS = {
    None: "model_metadata",
    "infer": "infer",
    "ready": "model_ready",
    "config": "model_config",
    "stats": "statistics",
}


def route(raw_path: str) -> Route:
    """The route of a raw request path (query string removed)."""
    if raw_path == "/v2":
        return Route("server_metadata")
    if raw_path == "/v2/models/stats":
        return Route("statistics")
    if match := _HEALTH.fullmatch(raw_path):
        return Route("live" if match.group(1) == "live" else "ready")
    if match := _MODEL.fullmatch(raw_path):
        model, version, kind = match.groups()
        if kind == "trace/setting":
            return Route("", not_offered="trace settings")
        return Route(_MODEL_KINDS[kind], unquote(model), unquote(version or ""))
    if match := _REPOSITORY.fullmatch(raw_path):
        repository, index, model, action = match.groups()
        name = unquote(repository or "")
        if index:
            return Route("repository_index", repository=name)
        return Route(action, model=unquote(model), repository=name)
    for pattern, feature in _NOT_OFFERED:
        if pattern.fullmatch(raw_path):
            return Route("", not_offered=feature)
    return _NOTHING
