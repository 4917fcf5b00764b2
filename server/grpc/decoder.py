"""Turning the bytes of a request into a message, before any handler runs.

gRPC calls the request deserializer on its own polling thread. One that raises makes
grpc-python log a traceback and answer INTERNAL; so this one never raises: a body that
is not a valid message, or is larger than the model it names can accept, becomes an
`Undecodable` that the handler answers with INVALID_ARGUMENT. Size is checked before the
message is parsed, from the model name at the head of the bytes, so an oversized body
costs no parsing at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from tiffin.protos.names import shown

from ..limits import PLAIN_REQUEST_MAX_BYTES, REQUEST_OVERHEAD_BYTES

# ModelInferRequest.model_name is field 1, length-delimited: serializers write it first.
_MODEL_NAME_TAG = 0x0A


@dataclass(frozen=True)
class Undecodable:
    """A request body that could not become a message, and why (a sentence)."""

    reason: str


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A protobuf varint at `pos` (at most 5 bytes here): its value and the next position."""
    value = shift = 0
    for i in range(pos, min(pos + 5, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def peek_model_name(data: bytes) -> str | None:
    """The model name at the head of a serialized ModelInferRequest, or None when the
    bytes do not start with it (the full parse then decides)."""
    if len(data) < 2 or data[0] != _MODEL_NAME_TAG:
        return None
    length, start = _varint(data, 1)
    if length < 0 or start + length > len(data):
        return None
    return data[start : start + length].decode("utf-8", "replace")


class RequestDecoder:
    """The deserializer for requests that name a model: bounded by that model's limit.

    `limits` maps each served model to the largest request it can accept (None: only the
    server's own message limit bounds it); it is replaced whole when models change.
    """

    def __init__(self, message_class: Any) -> None:
        self._parse: Callable[[bytes], Any] = message_class.FromString
        self.limits: Mapping[str, int | None] = {}

    def __call__(self, data: bytes) -> Any:
        size = len(data)
        large = size > REQUEST_OVERHEAD_BYTES  # any model accepts names and parameters
        name = peek_model_name(data) if large else None
        if name is not None and (problem := self._too_large(name, size)):
            return Undecodable(problem)
        try:
            message = self._parse(data)
        except DecodeError:
            return Undecodable(
                f"the request body ({size} bytes) is not a valid ModelInferRequest message"
            )
        if large and name is None and (problem := self._too_large(message.model_name, size)):
            return Undecodable(problem)
        return message

    def _too_large(self, model: str, size: int) -> str | None:
        """Why a body of `size` bytes (more than REQUEST_OVERHEAD_BYTES) is refused, or None."""
        if model not in self.limits:
            return (
                f"model '{shown(model)}' is not serving (unknown, or no version is ready yet), "
                f"so a request of {size} bytes for it is refused; check the name, or retry "
                "once the model is ready"
            )
        limit = self.limits[model]
        if limit is not None and size > limit:
            return (
                f"the request is {size} bytes, but model '{shown(model)}' accepts at most "
                f"{limit} bytes (its largest batch of every input, plus "
                f"{REQUEST_OVERHEAD_BYTES} bytes for names and parameters)"
            )
        return None


def plain_decoder(message_class: Any) -> Callable[[bytes], Any]:
    """The deserializer for small requests that carry no tensor data: never raises."""
    parse = message_class.FromString

    def decode(data: bytes) -> Any:
        if len(data) > PLAIN_REQUEST_MAX_BYTES:
            return Undecodable(
                f"the request is {len(data)} bytes; this call accepts at most "
                f"{PLAIN_REQUEST_MAX_BYTES} bytes"
            )
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(f"the request body ({len(data)} bytes) is not a valid message")

    return decode
