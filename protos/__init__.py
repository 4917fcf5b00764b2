"""The wire contract: protocol messages, datatypes, tensor codec, config schema, errors."""

from .messages import SERVICE_NAME, method_path, protocol

__all__ = ["SERVICE_NAME", "method_path", "protocol"]
