"""`serverctl validate`: check a model repository without serving it."""

from __future__ import annotations

import argparse
from pathlib import Path

from tiffin.protos.model_config import ModelConfig

from ..pipelines import complete_pipeline
from ..repository import ModelSpec, read_repository

HELP = "Check every model in a repository offline; exit status 1 if any problem is found."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_repository", type=Path, help="Folder of models to check.")


def run(args: argparse.Namespace) -> int:
    try:
        specs = read_repository(args.model_repository)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 1
    problems = 0
    for spec in specs:
        found = spec.problems + _pipeline_problems(spec, specs)
        if not found:
            versions = ", ".join(str(v.version) for v in spec.versions)
            print(f"ok      {spec.name} (version {versions})")
            continue
        print(f"broken  {spec.name}")
        for problem in found:
            for line in problem.splitlines():
                print(f"        {line}")
        problems += len(found)
    if not specs:
        print(f"error: {args.model_repository} holds no model folders")
        return 1
    print(f"{len(specs)} model(s), {problems} problem(s)")
    return 1 if problems else 0


def _pipeline_problems(spec: ModelSpec, specs: list[ModelSpec]) -> list[str]:
    """Whether a pipeline's steps connect, judged from the step models' files on disk."""
    by_name = {s.name: s for s in specs}
    problems = []
    for version in spec.versions:
        if version.config is not None and version.config.pipeline is not None:
            try:
                _complete(version.config, by_name, visiting={spec.name})
            except ValueError as exc:
                problems.append(f"{spec.path / 'config.yaml'}: {exc}")
    return problems


def _complete(
    config: ModelConfig, by_name: dict[str, ModelSpec], visiting: set[str]
) -> ModelConfig:
    """A pipeline's config completed from its step models' (pipelines among them completed
    first); ValueError naming the field when that cannot be done."""
    assert config.pipeline is not None
    steps = {}
    for i, step in enumerate(config.pipeline.steps):
        step_versions = by_name[step.model].versions if step.model in by_name else []
        usable = {v.version: v.config for v in step_versions if v.config}
        number = max(usable, default=None) if step.version == -1 else step.version
        if number not in usable or step.model in visiting:
            which = "" if step.version == -1 else f" {step.version}"
            why = (
                "calls back into this pipeline"
                if step.model in visiting
                else f"has no usable version{which}"
            )
            raise ValueError(f"pipeline.steps[{i}]: model '{step.model}' {why}")
        step_config = usable[number]
        assert step_config is not None
        if step_config.pipeline is not None:
            step_config = _complete(step_config, by_name, visiting | {step.model})
        steps[i] = step_config
    try:
        return complete_pipeline(config, steps)
    except ValueError as exc:
        raise ValueError(f"pipeline: {exc}") from None
