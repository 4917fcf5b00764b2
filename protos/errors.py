"""One error tree for everything a request can run into, each carrying its gRPC status.

Core code raises these; each front door maps them to its status once (server/grpc/service.py,
server/rest/).
Messages are sentences a user can act on, following Triton's wording where one exists.
"""

from __future__ import annotations

import grpc


class TiffinError(Exception):
    """Base of all errors that reach a client; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TiffinError):
    """The request itself is wrong: shape, datatype, size, names, parameters."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownModel(TiffinError):
    """A model name the server has never seen (Triton: INVALID_ARGUMENT, not NOT_FOUND)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(TiffinError):
    """A known model without the requested or any available version."""

    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(TiffinError):
    """The model or version exists but is not ready to serve, or is going away."""

    code = grpc.StatusCode.UNAVAILABLE


class ServerNotReady(TiffinError):
    """The server is starting up or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(TiffinError):
    """The model's queue is at max_queue_size (Triton answers UNAVAILABLE; RESOURCE_EXHAUSTED
    tells clients more precisely to back off)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(TiffinError):
    """The server refuses work it cannot take now: too many streams, or a request that
    cannot finish before its deadline. Sent at once, so that the client can back off."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestTimeout(TiffinError):
    """The request waited in the queue past its timeout."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TiffinError):
    """The client's deadline passed before the request ran."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TiffinError):
    """The client went away before the request ran."""

    code = grpc.StatusCode.CANCELLED


class Unsupported(TiffinError):
    """An RPC or feature this server does not offer."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(TiffinError):
    """The caller sent no credentials, or credentials that are not valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TiffinError):
    """The caller is known but lacks the role the call needs; the message names the role."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotEnabled(TiffinError):
    """A call this server was not started to take (model control mode 'none')."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BackendError(TiffinError):
    """The backend failed while running a batch (the exception's message is kept)."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(TiffinError):
    """A model configuration problem: file, field path and what was expected."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RemoteError(TiffinError):
    """A remote server answered an error (triton passthrough backend): the caller gets the
    remote's own status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
