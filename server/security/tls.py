"""TLS and mutual TLS for both front doors, with certificates read again when they change.

gRPC: `grpc.dynamic_ssl_server_credentials` asks for the certificate configuration at each
new connection's handshake; it gets a new one once the files changed. HTTPS: the server's
`ssl.SSLContext` has an SNI callback (OpenSSL calls it for every ClientHello, server name or
not) that hands the handshake the current context. Either way connections already open keep
going on the old certificate, and new ones get the new: no restart, nothing dropped. A
certificate and key that do not belong together (files replaced one at a time) are not
taken; the old pair serves until both are in place.

The client certificate's subject, in RFC 4514 spelling (`CN=alice,O=Example`, as
`openssl x509 -noout -subject -nameopt RFC2253` prints it), is what the token file's
`certificate_subject` names.
"""

from __future__ import annotations

import functools
import ssl
import warnings
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from .watched import WatchedFiles


class TlsConfigError(ValueError):
    """Certificate files that cannot be used; the message names the file."""


def _check_pair(cert: str, key: str, root: str) -> None:
    """Raises TlsConfigError unless the certificate and key load and belong together."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"the certificate {cert} and key {key} cannot be used together: {exc}"
        ) from None
    if root:
        try:
            context.load_verify_locations(root)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"the root certificates {root} cannot be used: {exc}") from None


def _files(cert: str, key: str, root: str) -> list[str]:
    return [p for p in (cert, key, root) if p]


def grpc_credentials(cert: str, key: str, root: str, mutual: bool) -> grpc.ServerCredentials:
    """Server credentials whose certificate follows the files."""

    def configuration() -> Any:
        _check_pair(cert, key, root)
        return grpc.ssl_server_certificate_configuration(
            [(Path(key).read_bytes(), Path(cert).read_bytes())],
            root_certificates=Path(root).read_bytes() if root else None,
        )

    watched = WatchedFiles(_files(cert, key, root), configuration, "gRPC TLS certificate")

    def fetch() -> Any:  # at each handshake: None keeps the current configuration
        return watched.value() if watched.changed() else None

    return grpc.dynamic_ssl_server_credentials(
        watched.value(), fetch, require_client_authentication=mutual
    )


class HttpsContext:
    """The SSLContext for the REST front door; `context` is what the listener takes."""

    def __init__(self, cert: str, key: str, root: str, mutual: bool) -> None:
        self._cert, self._key, self._root, self._mutual = cert, key, root, mutual
        self._watched = WatchedFiles(_files(cert, key, root), self._make, "HTTPS certificate")
        self.context = self._watched.value()
        self.context.sni_callback = self._current

    def _make(self) -> ssl.SSLContext:
        _check_pair(self._cert, self._key, self._root)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert, self._key)
        if self._root:
            context.load_verify_locations(self._root)
        context.verify_mode = ssl.CERT_REQUIRED if self._mutual else ssl.CERT_NONE
        return context

    def _current(self, connection: ssl.SSLObject, server_name: str | None, _: Any) -> None:
        current = self._watched.value()
        if current is not self.context:
            connection.context = current


@functools.lru_cache(maxsize=1024)
def subject_of_der(der: bytes) -> str:
    """A certificate's subject in RFC 4514 spelling ("" if it does not parse)."""
    try:
        with warnings.catch_warnings():  # odd certificates are the client's business
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except Exception:  # noqa: BLE001 - odd bytes raise odd errors (KeyError seen): no subject
        return ""


@functools.lru_cache(maxsize=1024)
def subject_of_pem(pem: bytes) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
    except Exception:  # noqa: BLE001
        return ""
