"""Tiffin's admin service on the gRPC port: rollouts, which the KServe protocol has no call for.

`tiffin.admin.v1.Admin` has three unary methods whose messages are JSON documents (UTF-8
bytes), so that any gRPC client can call them without generated code:

  Rollout          {"ref": "v2"}  ->  the history entry of the rollout
  Rollback         {}             ->  the history entry of the rollback
  RolloutHistory   {}             ->  {"history": [entries, oldest first]}
  Traffic          {}             ->  {"traffic": [each split: weights, rolled_back, shadow]}

They run through the data plane's interceptor chain like every other call (rollout and
rollback need the `admin` role, the history and traffic `read`), and fail with the same
statuses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import grpc

from tiffin.protos.errors import InvalidInput, TiffinError

from ..dataplane import DataPlane
from .service import _call_context

log = logging.getLogger(__name__)

SERVICE = "tiffin.admin.v1.Admin"
MAX_REQUEST_BYTES = 64 << 10


def _document(request: bytes) -> dict[str, Any]:
    if len(request) > MAX_REQUEST_BYTES:
        raise InvalidInput(f"an admin request may be at most {MAX_REQUEST_BYTES} bytes")
    try:
        document = json.loads(request or b"{}")
    except ValueError:
        raise InvalidInput("an admin request must be a JSON object") from None
    if not isinstance(document, dict):
        raise InvalidInput("an admin request must be a JSON object")
    return document


def admin_handler(plane: DataPlane, mutual: bool) -> grpc.GenericRpcHandler:
    """The admin service's handlers, on `plane`."""

    def rollout(call: Any, document: dict[str, Any]) -> Any:
        ref = document.get("ref")
        if not isinstance(ref, str) or not ref:
            raise InvalidInput('Rollout needs {"ref": "<a branch, tag or commit>"}')
        return asdict(plane.rollout(call, ref))

    def rollback(call: Any, document: dict[str, Any]) -> Any:
        return asdict(plane.rollback(call))

    def history(call: Any, document: dict[str, Any]) -> Any:
        return {"history": [asdict(e) for e in plane.rollout_history(call)]}

    def traffic(call: Any, document: dict[str, Any]) -> Any:
        return {"traffic": plane.traffic_state(call)}

    def unary(operation: str, behaviour: Callable[[Any, dict[str, Any]], Any]) -> Any:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            call = _call_context(context, operation, mutual)
            try:
                result = behaviour(call, _document(request))
            except TiffinError as exc:
                call.finish(exc.code.name)
                context.abort(exc.code, exc.message)
            except Exception as exc:  # a bug: answered, and logged
                log.exception("%s failed", operation)
                call.finish(grpc.StatusCode.INTERNAL.name)
                context.abort(grpc.StatusCode.INTERNAL, f"{operation} failed: {exc}")
            call.finish("OK")
            return json.dumps(result).encode()

        return grpc.unary_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Rollout": unary("rollout", rollout),
            "Rollback": unary("rollback", rollback),
            "RolloutHistory": unary("rollout_history", history),
            "Traffic": unary("traffic_state", traffic),
        },
    )
