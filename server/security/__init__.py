"""Who may call what: TLS, credentials, roles, the audit log and limits per client.

`Security` is all the rest of the server uses: built from the settings, it installs its
interceptors in the data plane's chain (authentication, authorization, audit, limits, and
the errors slot's path redaction) and gives each front door its TLS credentials. With no
--auth-* setting, callers are anonymous and every call is allowed except repository changes,
which follow --model-control-mode.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from tiffin.protos.errors import TiffinError
from tiffin.scheduler.context import RequestContext

from ..interceptors import Chain, map_errors
from ..settings import ServerSettings
from .audit import AuditLog
from .client_limits import ClientLimits
from .credentials import Authenticator
from .principals import Principal, TokenFile, token_digest
from .roles import CHANGE, Authorizer
from .tls import HttpsContext, grpc_credentials, subject_of_der, subject_of_pem
from .web_tokens import JwtVerifier

__all__ = ["Principal", "Security", "subject_of_der", "subject_of_pem", "token_digest"]

T = TypeVar("T")
# A file path in a message: an absolute path ending in a file name with an extension.
_FILE_PATH = re.compile(r"(?<![\w>.])(?:/[\w.+-]+)+/([\w+-][\w.+-]*\.\w+)")


class Security:
    """The server's security, as the settings ask for it."""

    def __init__(self, settings: ServerSettings, repository: Path) -> None:
        s = settings
        self.authenticating = s.authentication
        self.audit = (
            AuditLog(s.audit_log, s.audit_log_max_bytes, s.audit_log_backups)
            if (s.audit_log)
            else None
        )
        tokens = TokenFile(s.auth_token_file) if s.auth_token_file else None
        jwts = (
            JwtVerifier(
                s.auth_jwt_key,
                s.auth_jwks_file,
                s.auth_jwt_audience,
                s.auth_jwt_issuer,
                s.auth_jwt_roles_claim,
                s.auth_jwt_algorithms,
            )
            if s.auth_jwt_key or s.auth_jwks_file
            else None
        )
        self._authenticator = (
            Authenticator(tokens, jwts, s.auth_certificate_principals, self._refused)
            if self.authenticating
            else None
        )
        self._authorizer = Authorizer(self.authenticating, s.model_control_mode, self._refused)
        self._limits = (
            ClientLimits(s.client_max_inflight, s.client_max_rps, s.client_burst)
            if s.client_max_inflight or s.client_max_rps
            else None
        )
        self._repository = [str(repository.resolve()), str(repository)]
        self._grpc_tls = s.tls("grpc")
        self._http_tls = s.tls("http")
        self._settings = s
        self._https: HttpsContext | None = None
        # Told of each refusal (front door, kind): the metrics count them, as the chain's
        # metrics interceptor, inside authentication, never sees them.
        self.counted: Callable[[str, str], None] = lambda front_door, kind: None

    def install(self, chain: Chain) -> None:
        chain.install("errors", self._errors)
        if self._authenticator is not None:
            chain.install("authentication", self._authenticator)
        chain.install("authorization", self._authorizer)
        if self.audit is not None:
            chain.install("audit", self._audit_changes)
        if self._limits is not None:
            chain.install("limits", self._limits)

    def check(self, context: RequestContext) -> None:
        """Authenticates and authorizes a call before its body is read (REST); the chain
        then finds it done."""
        if self._authenticator is not None:
            self._authenticator(context, lambda: None)
        self._authorizer(context, lambda: None)

    # ---- TLS --------------------------------------------------------------------------

    @property
    def grpc_mutual(self) -> bool:
        return self._grpc_tls == "mutual"

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """None for plain text."""
        if not self._grpc_tls:
            return None
        cert, key, root = self._settings.tls_files("grpc")
        return grpc_credentials(cert, key, root, self.grpc_mutual)

    def https_context(self) -> ssl.SSLContext | None:
        """None for plain HTTP."""
        if not self._http_tls:
            return None
        if self._https is None:
            cert, key, root = self._settings.tls_files("http")
            self._https = HttpsContext(cert, key, root, self._http_tls == "mutual")
        return self._https.context

    # ---- interceptors -----------------------------------------------------------------

    def _refused(self, context: RequestContext, reason: str) -> None:
        if not self.authenticating:
            kind = "not_enabled"  # a repository change in model control mode 'none'
        else:
            kind = "permission_denied" if context.principal else "unauthenticated"
        self.counted(context.front_door, kind)
        if self.audit is not None:
            self.audit.record(context, "refused", reason)

    def _audit_changes(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        if context.operation not in CHANGE or self.audit is None:
            return proceed()
        try:
            result = proceed()
        except TiffinError as exc:
            self.audit.record(context, "failed", exc.message)
            raise
        self.audit.record(context, "ok")
        return result

    def _errors(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        """The errors slot, with server file paths taken out of what non-admins are told."""
        try:
            return map_errors(context, proceed)
        except TiffinError as exc:
            if "admin" not in context.roles:
                exc.message = self.redact(exc.message)
                exc.args = (exc.message,)
            raise

    def redact(self, message: str) -> str:
        """`message` without server paths: the repository's folder becomes "<repository>",
        other file paths their file name."""
        for root in self._repository:
            message = message.replace(root, "<repository>")
        return _FILE_PATH.sub(lambda m: m.group(1), message)
