"""JWT bearer tokens, verified against a public key or a JWKS file (PyJWT does the maths).

A token is accepted when its signature checks with one of the configured keys under one of
the configured asymmetric algorithms, it has not expired (`exp` is required), it is not
used before `nbf`, and its `aud` and `iss` are the configured ones (when configured). The
principal is its `sub`; its roles come from the roles claim (a list, or a space-separated
string as OAuth scopes are), and an optional `models` claim limits inference to those models.

Verifying a signature costs tens of microseconds, so a verified token is remembered (by its
digest, until it expires, a bounded number of them) and a client that sends the same token
on every call pays once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tiffin.protos.errors import Unauthenticated

from .principals import ROLES, Principal
from .watched import WatchedFiles

# Symmetric algorithms would let anyone holding the verification key mint tokens.
ASYMMETRIC = {
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
}  # fmt: skip
MAX_TOKEN_CHARS = 8192
MAX_KEY_FILE_BYTES = 1 << 20
_REMEMBERED = 4096
_LEEWAY_SECONDS = 5


class JwtConfigError(ValueError):
    """Key files or settings for JWTs that cannot be used."""


def parse_algorithms(text: str) -> list[str]:
    algorithms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in algorithms if a not in ASYMMETRIC]
    if bad or not algorithms:
        raise JwtConfigError(
            "--auth-jwt-algorithms may name only asymmetric algorithms "
            f"({', '.join(sorted(ASYMMETRIC))})" + (f"; not {', '.join(bad)}" if bad else "")
        )
    return algorithms


def _read(path: str) -> str:
    file = Path(path)
    try:
        if file.stat().st_size > MAX_KEY_FILE_BYTES:
            raise JwtConfigError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes")
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise JwtConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise JwtConfigError(f"{path} is not UTF-8 text") from None


def _load_keys(key_file: str, jwks_file: str) -> dict[str, Any]:
    """Verification keys by key id ("" for the --auth-jwt-key file, which has none)."""
    keys: dict[str, Any] = {}
    if key_file:
        keys[""] = _public_key(_read(key_file), key_file)
    if jwks_file:
        try:
            document = json.loads(_read(jwks_file))
            for index, jwk in enumerate(jwt.PyJWKSet.from_dict(document).keys):
                keys[jwk.key_id or f"#{index}"] = jwk.key
        except (ValueError, jwt.exceptions.PyJWKSetError, jwt.exceptions.PyJWKError) as exc:
            raise JwtConfigError(f"{jwks_file} is not a usable JWKS file: {exc}") from None
    return keys


def _public_key(pem: str, path: str) -> Any:
    """A PEM public key of any kind (RSA, EC, Ed25519), for the algorithms that take it."""
    try:
        return load_pem_public_key(pem.encode())
    except ValueError:
        raise JwtConfigError(f"{path} holds no PEM public key") from None


class JwtVerifier:
    """Checks JWTs and names their principals."""

    def __init__(
        self,
        key_file: str,
        jwks_file: str,
        audience: str,
        issuer: str,
        roles_claim: str,
        algorithms: str,
    ) -> None:
        self._algorithms = parse_algorithms(algorithms)
        paths = [p for p in (key_file, jwks_file) if p]
        self._keys = WatchedFiles(paths, lambda: _load_keys(key_file, jwks_file), "JWT keys")
        self._audience = audience or None
        self._issuer = issuer or None
        self._roles_claim = roles_claim
        # digest -> (principal, expiry, which keys verified it); oldest first
        self._remembered: dict[str, tuple[Principal, float, int]] = {}
        self._lock = threading.Lock()

    def principal(self, token: str) -> Principal:
        """The token's principal; Unauthenticated saying what was wrong otherwise."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
        keys = self._keys.value()
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        found = self._remembered.get(digest)
        if found is not None and found[1] > time.time() and found[2] == self._keys.reloads:
            return found[0]
        claims = self._verify(token, keys)
        principal = self._from_claims(claims)
        with self._lock:
            if len(self._remembered) >= _REMEMBERED:
                del self._remembered[next(iter(self._remembered))]
            self._remembered[digest] = (principal, float(claims["exp"]), self._keys.reloads)
        return principal

    def _verify(self, token: str, keys: dict[str, Any]) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError:
            raise Unauthenticated("the bearer token is neither a known token nor a JWT") from None
        kid = header.get("kid")
        if isinstance(kid, str) and kid in keys:
            key = keys[kid]
        elif len(keys) == 1:
            key = next(iter(keys.values()))
        else:
            raise Unauthenticated("the JWT names no key this server trusts ('kid')")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_SECONDS,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.exceptions.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired ('exp')") from None
        except jwt.exceptions.ImmatureSignatureError:
            raise Unauthenticated("the JWT is not valid yet ('nbf')") from None
        except jwt.exceptions.InvalidAudienceError:
            raise Unauthenticated("the JWT is for another audience ('aud')") from None
        except jwt.exceptions.InvalidIssuerError:
            raise Unauthenticated("the JWT is from another issuer ('iss')") from None
        except jwt.exceptions.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the JWT has no '{exc.claim}' claim") from None
        except jwt.exceptions.InvalidAlgorithmError:
            raise Unauthenticated("the JWT is signed with an algorithm not accepted") from None
        except jwt.exceptions.InvalidSignatureError:
            raise Unauthenticated("the JWT's signature does not verify") from None
        except jwt.exceptions.InvalidKeyError:
            raise Unauthenticated(
                "the JWT's algorithm does not fit this server's key, so its signature does not "
                "verify"
            ) from None
        except jwt.exceptions.PyJWTError:
            raise Unauthenticated("the JWT is malformed") from None
        except (ValueError, TypeError):  # a key of another kind than the token's algorithm
            raise Unauthenticated(
                "the JWT's signature does not verify with this server's keys"
            ) from None

    def _from_claims(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            raise Unauthenticated("the JWT's 'sub' claim is not a name")
        raw = claims.get(self._roles_claim, [])
        listed = raw.split() if isinstance(raw, str) else raw
        if not isinstance(listed, list):
            raise Unauthenticated(f"the JWT's '{self._roles_claim}' claim is not a list of roles")
        roles = frozenset(r for r in listed if isinstance(r, str) and r in ROLES)
        models = claims.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise Unauthenticated("the JWT's 'models' claim is not a list of model names")
        return Principal(subject, roles, frozenset(models))
