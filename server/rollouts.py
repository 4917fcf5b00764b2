"""Rollouts from a config repository in git: serve a ref, switch to another, roll back.

`--model-repository git+file:///srv/models.git@main` (or a local working tree, whose own git
history is the source) makes the server export that ref's tree into a fresh folder and serve
it. `serverctl rollout --ref REF` asks the running server to move to another ref, in steps:

  fetch     resolve REF to a commit of the source repository
  checkout  export the commit's tree into a fresh folder (`git archive`; no .git inside)
  validate  read every model folder as `serverctl validate` does; any problem stops here
  load      build and warm every model that differs from what serves, beside it
  switch    the changed models take over at once, removed ones unload

Any failing step leaves the current ref serving and is reported with its name and reason.
Each attempt is a line of the history (ref, commit, time, who, outcome, failed step, reason),
and `rollback` moves back to the commit that served before the current one. Exports live in
the rollout store (TIFFIN_ROLLOUT_STORE, default ~/.tiffin/rollouts), a folder per source
repository; the last few are kept for rollbacks, older ones removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tiffin.protos.errors import InvalidInput, TiffinError

from .commands.validate import IMPORT_TIMEOUT, check_repository
from .registry import ModelRegistry, SwitchFailed
from .repository import ModelSpec, read_repository

log = logging.getLogger(__name__)

GIT_PREFIX = "git+file:"
KEEP_EXPORTS = 5
MAX_REF_CHARS = 256
_GIT_SECONDS = 120.0


class RolloutFailed(TiffinError):
    """A rollout step that failed; the current ref keeps serving."""

    code = InvalidInput.code

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"rollout failed at step '{step}': {reason}; the current ref serves on")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class GitSource:
    """Where rollouts come from: a git directory, and the ref served at start."""

    git_dir: str  # a bare repository, or a working tree's folder
    ref: str

    @staticmethod
    def parse(location: str) -> GitSource | None:
        """The git source a --model-repository value names, or None for a plain folder
        (a plain folder inside a git working tree is served as it is)."""
        if not location.startswith(GIT_PREFIX):
            return None
        rest = location[len(GIT_PREFIX) :].lstrip("/")
        path, _, ref = rest.rpartition("@") if "@" in rest else (rest, "", "HEAD")
        return GitSource("/" + path, ref or "HEAD")

    def git(self, *args: str, stdin: bytes | None = None) -> bytes:
        """Runs git on the source; RuntimeError with git's own words when it fails."""
        try:
            done = subprocess.run(
                ["git", f"--git-dir={self._git_dir()}", *args],
                input=stdin,
                capture_output=True,
                timeout=_GIT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"git {args[0]} could not run: {exc}") from None
        if done.returncode != 0:
            words = done.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(words[-1] if words else f"git {args[0]} failed")
        return done.stdout

    def _git_dir(self) -> str:
        inner = Path(self.git_dir) / ".git"
        return str(inner) if inner.exists() else self.git_dir

    def commit(self, ref: str) -> str:
        if not ref or len(ref) > MAX_REF_CHARS or ref.startswith("-") or "\n" in ref:
            raise RuntimeError(f"'{ref[:80]}' is not a ref")
        return self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()

    def export(self, commit: str, folder: Path) -> None:
        """The commit's tree, written into `folder` (made here)."""
        archive = self.git("archive", "--format=tar", commit)
        folder.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")  # no links out, no devices, no owners


@dataclass(frozen=True)
class HistoryEntry:
    ref: str
    commit: str
    time: str
    who: str
    outcome: str  # "ok" or "failed"
    step: str = ""  # the step that failed
    reason: str = ""
    action: str = "rollout"  # or "rollback", "start"


class Rollouts:
    """The rollouts of one server: its source, its store folder and history."""

    def __init__(self, source: GitSource, allowed: list[str] | None = None) -> None:
        self.source = source
        self.allowed = allowed
        # Set once the server has them: the registry, and a way to run its coroutines on
        # the scheduler's loop and wait for them.
        self.registry: ModelRegistry | None = None
        self.run_on_loop: Callable[[Coroutine[Any, Any, None]], None] | None = None
        store = Path(os.environ.get("TIFFIN_ROLLOUT_STORE") or Path.home() / ".tiffin/rollouts")
        digest = hashlib.sha256(os.path.abspath(source.git_dir).encode()).hexdigest()[:12]
        self.folder = store / f"{Path(source.git_dir).name}-{digest}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._history = self.folder / "history.jsonl"
        self.serving: HistoryEntry | None = None
        self._lock = threading.Lock()  # one rollout at a time

    # ---- at start -----------------------------------------------------------------------

    def first_export(self) -> Path:
        """Exports the start ref; the folder to serve (OSError with a sentence if it fails)."""
        try:
            commit = self.source.commit(self.source.ref)
            folder = self._export(commit)
        except RuntimeError as exc:
            raise OSError(f"cannot serve {self.source.git_dir}@{self.source.ref}: {exc}") from None
        self.serving = self._record(self.source.ref, commit, "server", "ok", action="start")
        return folder

    def _export(self, commit: str) -> Path:
        folder = self.folder / "exports" / commit
        if not folder.is_dir():
            aside = self.folder / "exports" / f".{commit}.{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            self.source.export(commit, aside)
            aside.rename(folder)
        return folder

    # ---- rollouts -------------------------------------------------------------------------

    def rollout(self, ref: str, who: str, action: str = "rollout") -> HistoryEntry:
        """Moves the server to `ref` (runs on a front-door thread; the registry's work runs
        on its loop through `run_on_loop`). RolloutFailed naming the step otherwise."""
        if not self._lock.acquire(blocking=False):
            raise RolloutFailed("fetch", "another rollout is under way; try again after it")
        try:
            return self._rollout(ref, who, action)
        finally:
            self._lock.release()

    def _rollout(self, ref: str, who: str, action: str) -> HistoryEntry:
        commit = ""
        step = "fetch"
        try:
            commit = self.source.commit(ref)
            step = "checkout"
            folder = self._export(commit)
            step = "validate"
            specs = read_repository(folder, self.allowed)
            problems = self._problems(specs)
            if problems:
                raise RuntimeError("; ".join(problems[:5]))
            step = "load"
            assert self.registry is not None and self.run_on_loop is not None
            changed, removed = self._difference(self.serving.commit if self.serving else "", commit)
            specs = [s for s in specs if s.name in changed]
            self.run_on_loop(self.registry.switch(folder, specs, removed))
        except (RuntimeError, SwitchFailed, OSError) as exc:
            entry = self._record(ref, commit, who, "failed", step, str(exc), action)
            log.error("%s to %s failed at step '%s': %s", action, ref, step, exc)
            raise RolloutFailed(step, str(exc)) from None
        entry = self._record(ref, commit, who, "ok", action=action)
        log.info(
            "%s to %s (%s): %d model(s) changed, %d removed",
            action,
            ref,
            commit[:12],
            len(changed),
            len(removed),
        )
        self.serving = entry
        self._prune()
        return entry

    def _difference(self, serving: str, commit: str) -> tuple[list[str], list[str]]:
        """The model folders that differ between two commits, and those gone in the second
        (git compares contents; exports' times say nothing, as git sets them to commit
        times)."""

        def folders(of: str) -> set[str]:
            listed = self.source.git("ls-tree", "-d", "--name-only", of).decode().splitlines()
            return {name for name in listed if not name.startswith((".", "_"))}

        new = folders(commit)
        if not serving:
            return sorted(new), []
        paths = self.source.git("diff", "--name-only", serving, commit).decode().splitlines()
        changed = {path.split("/", 1)[0] for path in paths} & new
        return sorted(changed), sorted(folders(serving) - new)

    def rollback(self, who: str) -> HistoryEntry:
        """Back to the commit that served before the current one."""
        served = [e for e in self.history() if e.outcome == "ok"]
        current = self.serving.commit if self.serving else ""
        earlier = [e for e in served if e.commit != current]
        if not earlier:
            raise RolloutFailed("fetch", "no earlier ref has served to roll back to")
        return self.rollout(earlier[-1].commit, who, action="rollback")

    def history(self) -> list[HistoryEntry]:
        if not self._history.exists():
            return []
        entries = []
        for line in self._history.read_text().splitlines():
            try:
                entries.append(HistoryEntry(**json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line cut short by a crash
        return entries

    @staticmethod
    def _problems(specs: list[ModelSpec]) -> list[str]:
        """What `serverctl validate` would report as broken, or as unable to load here
        (python models' imports in a process of their own, pipelines' steps)."""
        verdicts = check_repository(specs, IMPORT_TIMEOUT)
        return [
            f"{name}: {problem.splitlines()[0]}"
            for name, verdict in sorted(verdicts.items())
            for problem in verdict.problems + verdict.environment
        ]

    def _record(
        self,
        ref: str,
        commit: str,
        who: str,
        outcome: str,
        step: str = "",
        reason: str = "",
        action: str = "rollout",
    ) -> HistoryEntry:
        entry = HistoryEntry(
            ref=ref[:MAX_REF_CHARS],
            commit=commit,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
            who=who or "(anonymous)",
            outcome=outcome,
            step=step,
            reason=reason[:1000],
            action=action,
        )
        with open(self._history, "a") as file:
            file.write(json.dumps(asdict(entry)) + "\n")
            file.flush()
            os.fsync(file.fileno())
        return entry

    def _prune(self) -> None:
        """Keeps the newest exports (what serves among them); removes older ones."""
        exports = self.folder / "exports"
        serving = self.registry.repository.name if self.registry else ""
        folders = sorted(
            (p for p in exports.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in folders[:-KEEP_EXPORTS]:
            if old.name != serving:
                shutil.rmtree(old, ignore_errors=True)
