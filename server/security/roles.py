"""What each role may call, and the check the authorization slot runs on every call.

| role    | calls                                                                          |
|---------|--------------------------------------------------------------------------------|
| (none)  | server live and ready (probes), and the gRPC health service                    |
| `infer` | inference, and the metadata, config and readiness of the models it may infer   |
| `read`  | metadata, config, readiness, statistics of every model, the repository index,   |
|         | the rollout history and the traffic splits                                      |
| `admin` | load, unload, rollout, rollback: whatever changes what the server serves      |

Roles do not include one another: an operator who loads models and watches them holds
`[admin, read]`. An operation this table does not know needs `admin`, so a call added later
is closed until it is placed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tiffin.protos.errors import NotEnabled, PermissionDenied
from tiffin.scheduler.context import RequestContext

T = TypeVar("T")

OPEN = frozenset({"live", "ready"})
INFER = frozenset({"infer", "stream_infer"})
# What a client needs to call a model it may infer (tritonclient and perf_analyzer ask).
ABOUT_A_MODEL = frozenset({"model_ready", "model_metadata", "model_config"})
READ = ABOUT_A_MODEL | {
    "server_metadata",
    "statistics",
    "repository_index",
    "rollout_history",
    "traffic_state",
}
CHANGE = frozenset({"load", "unload", "rollout", "rollback"})


def needed_role(operation: str) -> str:
    """The role an operation needs ("" for the open ones)."""
    if operation in OPEN:
        return ""
    if operation in INFER:
        return "infer"
    if operation in READ:
        return "read"
    return "admin"


class Authorizer:
    """The authorization slot: refuses a call whose principal lacks the role it needs, and
    repository changes that the model control mode does not take.

    `authenticating` is whether callers have principals at all; without authentication every
    call but a repository change is allowed, as before roles existed.
    """

    def __init__(self, authenticating: bool, control_mode: str, on_denied: Callable[..., None]):
        self._authenticating = authenticating
        self._mode = control_mode
        self._on_denied = on_denied  # the audit log's record of a refusal

    def __call__(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        operation = context.operation
        if operation in CHANGE:
            self._check_change(context)
        elif self._authenticating and operation not in OPEN:
            self._check_role(context, operation)
        return proceed()

    def _check_role(self, context: RequestContext, operation: str) -> None:
        roles = context.roles
        if "read" in roles and operation in READ:
            return
        if "infer" in roles and (operation in INFER or operation in ABOUT_A_MODEL):
            models = context.allowed_models
            if not models or context.model in models:
                return
            self._deny(
                context,
                f"'{context.principal}' may not use model '{context.model}' (its 'infer' role "
                "is limited to other models)",
            )
        if operation == "server_metadata" and "infer" in roles:
            return
        role = needed_role(operation)
        self._deny(
            context, f"{operation} needs the '{role}' role, which '{context.principal}' lacks"
        )

    def _check_change(self, context: RequestContext) -> None:
        if self._authenticating:  # an admin may change the repository in any mode
            if "admin" not in context.roles:
                self._deny(
                    context,
                    f"{context.operation} needs the 'admin' role, which '{context.principal}' "
                    "lacks",
                )
        elif self._mode != "explicit":
            self._on_denied(context, f"model control mode '{self._mode}'")
            raise NotEnabled(
                f"{context.operation} is off: the server runs in model control mode "
                f"'{self._mode}'; start it with --model-control-mode explicit, or with --auth-* "
                "and call as a principal with the 'admin' role, to load and unload models by "
                "request"
            )

    def _deny(self, context: RequestContext, reason: str) -> None:
        self._on_denied(context, reason)
        raise PermissionDenied(reason)
