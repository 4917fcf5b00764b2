"""`serverctl validate`: check a model repository as serving it would, without serving it.

Runs what `serve` checks when it loads each model, short of starting its instances: it reads
every config.yaml and model file (server/repository.py), places each model's instances on this
machine's devices and asks its backend whether it can run there, imports each python model's
model.py and finds its Backend subclass (in a process of its own, so that the file's code
cannot touch this one, bounded by --import-timeout), and checks each pipeline against the step
model versions that would load (server/pipelines.py). So in the same environment `serve` makes
UNAVAILABLE the models `validate` reports, for the reasons it reports.

What this environment lacks (a framework that is not installed, a GPU that is not here) is a
warning, not a problem: the repository is fine, and the model loads where that is present.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tiffin.backends import ForwardingBackend, MissingDependency, get_backend
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler.devices import place_instances

from ..pipelines import StepModel, StepNotReady, complete_pipeline, step_configs
from ..repository import CONFIG_FILE, ModelSpec, VersionSpec, read_repository

HELP = "Check every model of a repository as serving it would, without serving it."

EXIT_STATUSES = """\
exit status:
  0  no problem found; warnings may be printed: a model that cannot load in this environment
     (PyTorch or ONNX Runtime not installed, a GPU asked for that is not here), which serve
     here would make UNAVAILABLE with the reason printed, or a folder that is ignored
  1  problems found: a broken model (serve makes it UNAVAILABLE in any environment), or a
     repository that cannot be read
  2  the command line is wrong
"""

#: Seconds that importing one model.py may take, by default.
IMPORT_TIMEOUT = 60.0

# Runs in a process of its own: imports model.py as an instance's load does and answers, as
# JSON on the original stdout, the class to serve or why there is none. What model.py prints
# goes to stderr instead, so that it cannot be mistaken for the answer; threads it started
# cannot keep the process from ending once it has answered.
_IMPORT_CHECK = """\
import json, os, sys
from pathlib import Path
answer = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
from tiffin.backends.python import PythonModelError, check_model_file
try:
    found = {"class": check_model_file(Path(sys.argv[1]), sys.argv[2])}
except PythonModelError as exc:
    found = {"error": str(exc)}
answer.write(json.dumps(found))
answer.close()
os._exit(0)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_repository", type=Path, help="Folder of models to check.")
    parser.add_argument(
        "--import-timeout",
        type=float,
        default=IMPORT_TIMEOUT,
        metavar="SECONDS",
        help="How long importing one python model's model.py may take before it is reported "
        f"as a problem (default: {IMPORT_TIMEOUT:g}).",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES


@dataclass
class Verdict:
    """What checking one model found."""

    problems: list[str] = field(default_factory=list)  # faults of the repository
    environment: list[str] = field(default_factory=list)  # what this environment lacks
    ready: dict[int, ModelConfig] = field(default_factory=dict)  # versions that would load


def run(args: argparse.Namespace) -> int:
    with _quiet_logs():
        try:
            specs = read_repository(args.model_repository)
        except FileNotFoundError as exc:
            print(f"error: {exc}")
            return 1
        verdicts = check_repository(specs, args.import_timeout)
    if not specs:
        print(f"error: {args.model_repository} holds no model folders")
        return 1
    problems = warnings = 0
    for spec in specs:
        verdict = verdicts[spec.name]
        if verdict.problems:
            print(f"broken  {spec.name}")
            lines, notes = verdict.problems, [*verdict.environment, *spec.warnings]
        elif verdict.environment:
            print(f"warning {spec.name}: cannot load in this environment")
            lines, notes = verdict.environment, spec.warnings
        else:
            print(f"ok      {spec.name} (version {', '.join(map(str, sorted(verdict.ready)))})")
            lines, notes = [], spec.warnings
        for found in [*lines, *(f"warning: {note}" for note in notes)]:
            for line in found.splitlines():
                print(f"        {line}")
        problems += len(verdict.problems)
        warnings += len(verdict.environment) + len(spec.warnings)
    print(
        f"{len(specs)} model(s), {problems} problem(s)"
        + (f", {warnings} warning(s)" if warnings else "")
    )
    return 1 if problems else 0


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """What the server would log while reading (an ignored folder, a GPU-less fallback) is
    printed here as part of the report instead."""
    logger = logging.getLogger("tiffin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_repository(specs: list[ModelSpec], import_timeout: float) -> dict[str, Verdict]:
    """Each model's verdict: what reading found, then what loading would find."""
    verdicts = {}
    checks = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        for spec in specs:
            if any(v.config and v.config.pipeline for v in spec.versions):
                continue  # pipelines are judged below, once their steps' verdicts are known
            verdicts[spec.name] = Verdict(list(spec.problems), list(spec.environment_problems))
            checks += [
                (verdicts[spec.name], v, pool.submit(_load_problem, spec, v, import_timeout))
                for v in spec.versions
                if v.config is not None
            ]
    for verdict, version, check in checks:
        problem, lacking = check.result()
        if lacking:
            verdict.environment.append(problem)
        elif problem:
            verdict.problems.append(problem)
        else:
            assert version.config is not None
            verdict.ready[version.version] = version.config
    pipelines = _Pipelines({s.name: s for s in specs}, verdicts)
    for spec in specs:
        if spec.name not in verdicts:
            pipelines.verdict(spec.name)
    return verdicts


def _load_problem(spec: ModelSpec, version: VersionSpec, import_timeout: float) -> tuple[str, bool]:
    """Why a version that read well would still not load here, as creating its executor and
    loading its instances would find, short of starting them; and whether that is something
    this environment lacks. ("", False) when it would load."""
    config = version.config
    assert config is not None
    backend = get_backend(config.backend)  # imported already, when the repository was read
    if issubclass(backend, ForwardingBackend):
        return "", False  # no instances: it connects to its remote when it loads
    try:
        placements = place_instances(config.instance_group, spec.name)
        backend.check_devices(config, [device for device, _ in placements])
    except (ValueError, MissingDependency) as exc:
        return f"{spec.path / CONFIG_FILE} (version {version.version}): {exc}", True
    if config.backend == "python":
        from tiffin.backends.python import CLASS_NAME_PARAMETER

        model_file = backend.model_path(config, version.path)
        class_name = str(config.parameters.get(CLASS_NAME_PARAMETER, ""))
        return _import_problem(model_file, class_name, import_timeout), False
    return "", False


def _import_problem(model_file: Path, class_name: str, timeout: float) -> str:
    """Why model.py does not give the python backend a class to serve ("" when it does),
    worded as loading it words it; found in a process of its own."""
    try:
        found = subprocess.run(
            [sys.executable, "-c", _IMPORT_CHECK, str(model_file), class_name],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return (
            f"{model_file}: importing it did not finish within {timeout:g} s "
            "(serverctl validate --import-timeout SECONDS allows longer)"
        )
    try:
        answer = json.loads(found.stdout)
    except ValueError:
        said = found.stderr.strip().splitlines()
        return f"{model_file}: importing it ended the process (exit status {found.returncode})" + (
            f": {said[-1]}" if said else ""
        )
    return str(answer.get("error", ""))


class _Pipelines:
    """Judges pipelines as loading them would, against the verdicts of the models their steps
    call (pipelines among them judged first)."""

    def __init__(self, specs: dict[str, ModelSpec], verdicts: dict[str, Verdict]) -> None:
        self._specs = specs
        self._verdicts = verdicts

    def verdict(self, name: str) -> Verdict:
        """The verdict of pipeline `name` (recursion stops at cycles: see `_find`)."""
        if name in self._verdicts:
            return self._verdicts[name]
        spec = self._specs[name]
        verdict = Verdict(list(spec.problems), list(spec.environment_problems))
        config_file = spec.path / CONFIG_FILE
        for version in spec.versions:
            if version.config is None:
                continue
            try:
                steps = step_configs(version.config, lambda m: self._find(m, name))
                verdict.ready[version.version] = complete_pipeline(version.config, steps)
            except StepNotReady as exc:
                step = self._verdicts.get(exc.model)
                lacking = step is not None and step.environment and not step.problems
                found = verdict.environment if lacking else verdict.problems
                found.append(f"{config_file}: pipeline: {exc}")
            except ValueError as exc:
                verdict.problems.append(f"{config_file}: pipeline: {exc}")
        # Versions of one pipeline share their steps: say each finding once.
        verdict.problems = list(dict.fromkeys(verdict.problems))
        verdict.environment = list(dict.fromkeys(verdict.environment))
        self._verdicts[name] = verdict
        return verdict

    def _find(self, model: str, pipeline: str) -> StepModel:
        """What `pipeline`'s step finds of `model` (see `step_configs`)."""
        if model not in self._specs:
            return None
        if self._reaches(model, pipeline):
            return {}, "it calls back into this pipeline, and pipelines in a cycle never load"
        verdict = self.verdict(model)
        if verdict.ready:
            return verdict.ready, ""
        if verdict.problems:
            return {}, f"model '{model}' is broken"
        return {}, f"model '{model}' cannot load in this environment"

    def _reaches(self, model: str, pipeline: str) -> bool:
        """Whether `model`'s steps (their steps, ...) call `pipeline`."""
        seen: set[str] = set()
        todo = [model]
        while todo:
            name = todo.pop()
            if name == pipeline:
                return True
            if name in seen or name not in self._specs:
                continue
            seen.add(name)
            todo.extend(self._specs[name].step_models())
        return False
