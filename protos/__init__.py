"""The wire contract: protocol messages, datatypes, tensor codec, config schema, errors."""

from .messages import (
    MAX_MESSAGE_BYTES,
    MESSAGE_SIZE_OPTIONS,
    SERVICE_NAME,
    method_path,
    protocol,
)

__all__ = ["MAX_MESSAGE_BYTES", "MESSAGE_SIZE_OPTIONS", "SERVICE_NAME", "method_path", "protocol"]
