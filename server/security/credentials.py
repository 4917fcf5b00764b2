"""The authentication slot: who a caller is, from its bearer token or client certificate.

`authorization: Bearer <token>` (gRPC metadata or HTTP header) is looked up in the token file
first, then verified as a JWT; with `--auth-certificate-principals`, a call with no token and
a verified client certificate is the principal the token file names for that subject. Anything
else is UNAUTHENTICATED with a sentence saying what was missing or wrong; the token itself is
never logged, echoed or recorded. Probes (server live and ready) need no credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tiffin.protos.errors import Unauthenticated
from tiffin.scheduler.context import RequestContext

from .principals import Principal, TokenFile
from .roles import OPEN
from .web_tokens import MAX_TOKEN_CHARS, JwtVerifier

T = TypeVar("T")
_SCHEME = "bearer "


class Authenticator:
    """Sets the call's principal, roles and models, or refuses the call."""

    def __init__(
        self,
        tokens: TokenFile | None,
        jwts: JwtVerifier | None,
        certificates: bool,
        on_refused: Callable[[RequestContext, str], object],
    ) -> None:
        self._tokens = tokens
        self._jwts = jwts
        self._certificates = certificates
        self._on_refused = on_refused  # the audit log's record of a refusal

    def __call__(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        # A principal is set once: REST checks before reading a body, then runs the chain.
        if not context.principal and context.operation not in OPEN:
            try:
                principal = self.identify(context)
            except Unauthenticated as exc:
                self._on_refused(context, exc.message)
                raise
            context.principal = principal.name
            context.roles = principal.roles
            context.allowed_models = principal.models
        return proceed()

    def identify(self, context: RequestContext) -> Principal:
        header = context.metadata.get("authorization")
        if header is None:
            return self._by_certificate(context)
        if len(header) > MAX_TOKEN_CHARS + len(_SCHEME):
            raise Unauthenticated(
                f"the authorization value is longer than {MAX_TOKEN_CHARS} characters"
            )
        if header[: len(_SCHEME)].lower() != _SCHEME:
            raise Unauthenticated("the authorization value must be 'Bearer <token>'")
        token = header[len(_SCHEME) :].strip()
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise Unauthenticated("the bearer token is empty or holds characters no token has")
        if self._tokens is not None:
            principal = self._tokens.by_token(token)
            if principal is not None:
                return principal
        if self._jwts is not None:
            return self._jwts.principal(token)
        raise Unauthenticated("the bearer token is not one this server knows")

    def _by_certificate(self, context: RequestContext) -> Principal:
        if self._certificates and context.client_certificate and self._tokens is not None:
            principal = self._tokens.by_subject(context.client_certificate)
            if principal is not None:
                return principal
            raise Unauthenticated(
                f"the client certificate '{context.client_certificate}' names no principal "
                "of this server, and no bearer token was sent"
            )
        raise Unauthenticated(
            "this server needs credentials: send 'authorization: Bearer <token>'"
            + (" or a known client certificate" if self._certificates else "")
        )
