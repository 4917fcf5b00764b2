"""The bundle file: a gzip'd tar written the same way every time, and read with distrust.

Writing: entries sorted by name, each a regular file with mode 0644, owner 0:0 and a fixed
mtime; gzip with mtime 0 and no file name. So the same files give the same bytes.

Reading (`unpack`): a bundle may come from anywhere, so before anything is written its
entries are checked (names relative and inside the bundle's folders, only files and folders,
no links or devices, bounded count and sizes, room on the disk); then files are written into
a fresh folder while their sha256 is computed, and each must match the manifest. Only a
bundle that passed every check is handed back; a failure removes what was written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .manifest import LOCK_FILE, MANIFEST_FILE, REPOSITORY_DIR, WHEELS_DIR, Manifest

#: The mtime of every entry: 2000-01-01, a fixed date that every tool shows as a date.
MTIME = 946684800
_TOP_LEVEL_FILES = (MANIFEST_FILE, LOCK_FILE)
_TOP_LEVEL_DIRS = (REPOSITORY_DIR, WHEELS_DIR)


@dataclass(frozen=True)
class Limits:
    """What a bundle may hold at most; beyond it, it is refused before anything is written."""

    max_entries: int = 100_000
    max_file_bytes: int = 64 << 30
    max_total_bytes: int = 256 << 30


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle, the entry and why."""


def write_archive(output: Path, entries: Iterable[tuple[str, Path | bytes | None]]) -> None:
    """Writes the tar.gz at `output`: each (name in the bundle, file or bytes, or None for an
    empty folder), sorted by name."""
    ordered = sorted(entries, key=lambda entry: entry[0])
    names = [name for name, _ in ordered]
    if len(set(names)) != len(names):
        raise ValueError("a bundle cannot hold two entries of the same name")
    partial = output.with_name(output.name + ".partial")
    with open(partial, "wb") as raw:
        # filename="" and mtime=0: the gzip header names no file and no time.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, content in ordered:
                    info = tarfile.TarInfo(name)
                    info.mode, info.mtime = 0o644, MTIME
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if content is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                    elif isinstance(content, bytes):
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
                    else:
                        info.size = content.stat().st_size
                        with open(content, "rb") as f:
                            tar.addfile(info, f)
    partial.replace(output)


def _name_problem(name: str) -> str:
    """Why an entry's name cannot be unpacked ("" when it can)."""
    if not name or "\0" in name or "\\" in name:
        return "is not a plain relative path"
    if name.startswith("/"):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "leads out of the bundle ('..')"
    if posixpath.normpath(name) != name.rstrip("/"):
        return "is not a normal path (empty or '.' parts)"
    top = name.rstrip("/").split("/")[0]
    if name.rstrip("/") in _TOP_LEVEL_FILES or top in _TOP_LEVEL_DIRS:
        return ""
    return f"is outside the bundle's layout ({', '.join(_TOP_LEVEL_FILES + _TOP_LEVEL_DIRS)})"


def _check_entries(
    tar: tarfile.TarFile, where: str, limits: Limits
) -> tuple[list[tarfile.TarInfo], set[str]]:
    """The bundle's file entries and folder names, after checking every entry's name, kind
    and size."""
    files: dict[str, tarfile.TarInfo] = {}
    folders: set[str] = set()
    count = total = 0
    for member in tar:
        count += 1
        if count > limits.max_entries:
            raise BundleError(f"{where}: holds more than {limits.max_entries} entries")
        problem = _name_problem(member.name)
        if problem:
            raise BundleError(f"{where}: entry {member.name!r} {problem}; refused")
        if member.isdir():
            folders.add(member.name.rstrip("/"))
            continue
        if not member.isfile():
            kind = "a link" if member.issym() or member.islnk() else "not a regular file"
            raise BundleError(
                f"{where}: entry {member.name!r} is {kind}; bundles hold only files and folders"
            )
        if member.size > limits.max_file_bytes:
            raise BundleError(
                f"{where}: entry {member.name!r} is {member.size} bytes, above the limit of "
                f"{limits.max_file_bytes}"
            )
        total += member.size
        if total > limits.max_total_bytes:
            raise BundleError(f"{where}: holds more than {limits.max_total_bytes} bytes")
        if member.name in files:
            raise BundleError(f"{where}: entry {member.name!r} appears twice")
        files[member.name] = member
    return list(files.values()), folders


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> Manifest:
    f = tar.extractfile(member)
    assert f is not None  # a regular file, checked
    return Manifest.from_bytes(f.read(), where)


def unpack(bundle: Path, expected_hash: str = "", limits: Limits | None = None) -> Path:
    """Unpacks `bundle` into a new temporary folder, returned once every check has passed;
    BundleError naming the entry otherwise. `expected_hash`: the content hash the bundle must
    have (a store's name for it). The caller removes the folder."""
    limits = limits or Limits()
    where = f"bundle {bundle}"
    try:
        tar = tarfile.open(bundle, mode="r:gz")
    except FileNotFoundError:
        raise BundleError(f"{where}: file not found") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{where}: not a readable .tar.gz ({exc})") from None
    target = Path(tempfile.mkdtemp(prefix="tiffin-bundle-"))
    try:
        with tar:
            try:
                members, folders = _check_entries(tar, where, limits)
                _unpack_checked(tar, members, folders, where, expected_hash, target)
            except (tarfile.TarError, EOFError, gzip.BadGzipFile) as exc:
                raise BundleError(f"{where}: not a readable .tar.gz ({exc})") from None
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _unpack_checked(
    tar: tarfile.TarFile,
    members: list[tarfile.TarInfo],
    folders: set[str],
    where: str,
    expected_hash: str,
    target: Path,
) -> None:
    by_name = {m.name: m for m in members}
    if MANIFEST_FILE not in by_name:
        raise BundleError(f"{where}: has no {MANIFEST_FILE}; it is not a Tiffin bundle")
    manifest = _read_manifest(tar, by_name.pop(MANIFEST_FILE), where)
    if expected_hash and manifest.content_hash != expected_hash:
        raise BundleError(
            f"{where}: its content hash is {manifest.content_hash}, not {expected_hash} as "
            "expected; the bundle was changed"
        )
    extra = sorted((set(by_name) - set(manifest.files)) | (folders - set(manifest.folders)))
    if extra:
        raise BundleError(f"{where}: {extra[0]} is not listed in the manifest; refused")
    missing = sorted((set(manifest.files) - set(by_name)) | (set(manifest.folders) - folders))
    if missing:
        raise BundleError(f"{where}: {missing[0]} is listed in the manifest but missing")
    needed = sum(m.size for m in members)
    free = shutil.disk_usage(target).free
    if needed > free:
        raise BundleError(f"{where}: unpacking needs {needed} bytes, {free} are free")
    (target / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    for folder in sorted(folders):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for name, member in sorted(by_name.items()):
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        digest = hashlib.sha256()
        with open(path, "xb") as out:
            while block := source.read(1 << 20):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != manifest.files[name]:
            raise BundleError(
                f"{where}: {name} does not match its sha256 in the manifest (expected "
                f"{manifest.files[name][:16]}..., found {digest.hexdigest()[:16]}...); "
                "the file was changed after the bundle was built"
            )


def read_manifest(bundle: Path) -> Manifest:
    """The manifest of `bundle`, without unpacking or checking the rest."""
    where = f"bundle {bundle}"
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            for member in tar:
                if member.name == MANIFEST_FILE and member.isfile():
                    return _read_manifest(tar, member, where)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{where}: not a readable .tar.gz ({exc})") from None
    raise BundleError(f"{where}: has no {MANIFEST_FILE}; it is not a Tiffin bundle")
