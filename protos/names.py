"""What a model name and a version string may be, checked before anything touches the disk.

A model name is also a folder name in the repository, so it is held to what is safe as
one path component: letters, digits, `_`, `-` and `.`, not starting with `.` or `_` (the
repository skips hidden folders), never `..`, at most MAX_NAME_LENGTH characters. Names
that clients send are echoed in errors only through `shown()`, which bounds them.
"""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 128
MAX_VERSION = 2**63 - 1  # versions travel as int64 in Triton's config
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_VERSION = re.compile(r"[0-9]{1,19}")
_SHOWN_LENGTH = 80


def shown(text: str, limit: int = _SHOWN_LENGTH) -> str:
    """`text` fit to quote in an error: printable, and cut to `limit` characters."""
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name, or None when it can."""
    if not name:
        return "a model name must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"a model name has at most {MAX_NAME_LENGTH} characters, not {len(name)}"
    if not _NAME.fullmatch(name) or ".." in name:
        return (
            f"'{shown(name)}' is not a model name: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit, without '..'"
        )
    return None


def is_model_name(name: str) -> bool:
    return name_problem(name) is None


def parse_version(text: str) -> int | None:
    """A version string as a number: None for "" (the newest), ValueError unless it is
    ASCII digits for a number that fits in int64."""
    if text == "":
        return None
    if not _VERSION.fullmatch(text) or int(text) > MAX_VERSION:
        raise ValueError(
            f"failed to get model version from specified version string '{shown(text)}' "
            '(use a whole number such as "1", or leave it empty for the newest)'
        )
    return int(text)
