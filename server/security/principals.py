"""Who callers are: principals with their roles, and the token file that names them.

The token file (YAML, `--auth-token-file`) stores only each token's SHA-256, never a token:

    principals:
      - name: alice
        roles: [infer]
        models: [classifier]          # optional: infer only these models
        token_sha256: 9f86d081...     # sha256 of the bearer token, 64 hex digits
      - name: deployer
        roles: [admin, read]
        certificate_subject: CN=deployer,O=Example   # a mutual-TLS client certificate

Tokens are random strings of at least 128 bits (`serverctl token` makes one), so a plain
SHA-256 cannot be reversed and a slow password hash would buy nothing but cost per call.
The file is read again when it changes (looked at at most once a second), so tokens are
added and revoked without a restart; a file that no longer parses keeps the last good one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .watched import WatchedFiles

ROLES = ("infer", "read", "admin")
# A token file is small; anything larger is a mistake or an attack on the parser.
MAX_FILE_BYTES = 1 << 20
MAX_PRINCIPALS = 10_000
MAX_NAME_CHARS = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name, roles, and (if limited) the models it may infer."""

    name: str
    roles: frozenset[str]
    models: frozenset[str] = frozenset()  # empty: every model

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


class TokenFileError(ValueError):
    """A token file that cannot be used; the message says where and what."""


def token_digest(token: str) -> str:
    """The SHA-256 a token file stores for `token`."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_token_file(text: str, source: str) -> tuple[dict[str, Principal], dict[str, Principal]]:
    """(principals by token digest, principals by certificate subject); TokenFileError
    naming the entry and the field when anything is wrong."""
    if len(text) > MAX_FILE_BYTES:
        raise TokenFileError(f"{source} is larger than {MAX_FILE_BYTES} bytes")
    try:
        document = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise TokenFileError(f"{source} is not valid YAML: {exc}") from None
    except RecursionError:
        raise TokenFileError(f"{source} nests lists or mappings too deeply to read") from None
    if not isinstance(document, dict) or not isinstance(document.get("principals"), list):
        raise TokenFileError(f"{source} must be a mapping with a 'principals' list")
    entries = document["principals"]
    if len(entries) > MAX_PRINCIPALS:
        raise TokenFileError(f"{source} names more than {MAX_PRINCIPALS} principals")
    by_token: dict[str, Principal] = {}
    by_subject: dict[str, Principal] = {}
    for index, entry in enumerate(entries):
        where = f"{source}, principal {index + 1}"
        principal, digest, subject = _entry(entry, where)
        if digest:
            if digest in by_token:
                raise TokenFileError(f"{where}: the same token_sha256 is given twice")
            by_token[digest] = principal
        if subject:
            by_subject[subject] = principal
    return by_token, by_subject


def _entry(entry: Any, where: str) -> tuple[Principal, str, str]:
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where} must be a mapping")
    unknown = set(entry) - {"name", "roles", "models", "token_sha256", "certificate_subject"}
    if unknown:
        raise TokenFileError(f"{where} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise TokenFileError(
            f"{where}: 'name' must be a string of 1 to {MAX_NAME_CHARS} characters"
        )
    where = f"{where} ({name})"
    roles = _strings(entry.get("roles"), "roles", where)
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise TokenFileError(
            f"{where}: 'roles' must list some of {', '.join(ROLES)}"
            + (f" (not {', '.join(bad)})" if bad else "")
        )
    models = _strings(entry.get("models", []), "models", where)
    digest = entry.get("token_sha256", "")
    if digest and (not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower())):
        raise TokenFileError(f"{where}: 'token_sha256' must be 64 hex digits")
    subject = entry.get("certificate_subject", "")
    if not isinstance(subject, str):
        raise TokenFileError(f"{where}: 'certificate_subject' must be a string")
    if not digest and not subject:
        raise TokenFileError(f"{where} needs a 'token_sha256' or a 'certificate_subject'")
    principal = Principal(name, frozenset(roles), frozenset(models))
    return principal, str(digest).lower(), normal_subject(subject)


def _strings(value: Any, field: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenFileError(f"{where}: '{field}' must be a list of strings")
    return value


def normal_subject(subject: str) -> str:
    """A certificate subject in one spelling: RFC 4514 components, no spaces around commas."""
    return ",".join(part.strip() for part in subject.split(",")) if subject else ""


class TokenFile:
    """The principals of a token file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._watched = WatchedFiles([path], self._read, f"token file {path}")

    def _read(self) -> tuple[dict[str, Principal], dict[str, Principal]]:
        try:
            if self._path.stat().st_size > MAX_FILE_BYTES:
                raise TokenFileError(f"{self._path} is larger than {MAX_FILE_BYTES} bytes")
            text = self._path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(
                f"cannot read the token file {self._path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise TokenFileError(f"{self._path} is not UTF-8 text") from None
        return parse_token_file(text, str(self._path))

    def by_token(self, token: str) -> Principal | None:
        # Looked up by digest: a lookup's timing can only tell about digests, which an
        # attacker cannot steer towards a real token.
        return self._watched.value()[0].get(token_digest(token))

    def by_subject(self, subject: str) -> Principal | None:
        return self._watched.value()[1].get(normal_subject(subject))
