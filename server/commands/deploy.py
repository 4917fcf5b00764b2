"""`serverctl deploy kubernetes`: the manifests of deploy/kubernetes for one image, rendered.

Copies the kustomize base and overlays into --output, adds a kustomization that picks the
overlay and sets the image, and renders it with `kubectl kustomize` into tiffin.yaml when
kubectl is here (otherwise it prints the command). The copy stays beside it, to change and
render again.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from tiffin.bundles.wheelhouse import tiffin_source_tree

HELP = "Render the Kubernetes manifests (deploy/kubernetes) for an image."
OVERLAYS = ("dev", "prod")
# [registry[:port]/]path[:tag][@digest], as Docker reads image references.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?P<name>(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>\w[\w.-]{0,127}))?(?:@(?P<digest>[a-z0-9]+:[0-9a-fA-F]{32,}))?$"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["kubernetes"], help="Where to deploy.")
    parser.add_argument("--image", required=True, help="The image, as name:tag (containerize).")
    parser.add_argument(
        "--overlay",
        choices=OVERLAYS,
        default="dev",
        help="dev: one CPU replica; prod: GPUs, autoscaled on queue time (default: dev).",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("tiffin-kubernetes"), help="Folder to write."
    )


def split_image(image: str) -> dict[str, str]:
    """A kustomize `images:` entry's new name, tag and digest for `image`."""
    found = _IMAGE.match(image)
    if not found:
        raise ValueError(f"--image {image!r} is not an image name such as registry/name:tag")
    entry = {"newName": found["name"]}
    if found["tag"] or not found["digest"]:
        entry["newTag"] = found["tag"] or "latest"  # as docker reads a name without one
    if found["digest"]:
        entry["digest"] = found["digest"]
    return entry


def run(args: argparse.Namespace) -> int:
    source = tiffin_source_tree() / "deploy" / "kubernetes"
    output: Path = args.output
    shutil.rmtree(output / "kubernetes", ignore_errors=True)
    shutil.copytree(source, output / "kubernetes")
    overlay = output / "kubernetes" / "overlays" / args.overlay
    overlay_config = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    # The overlay has already named its image; this kustomization renames that one.
    (named,) = overlay_config["images"]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"kubernetes/overlays/{args.overlay}"],
        "images": [{"name": named["newName"], **split_image(args.image)}],
    }
    (output / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    command = ["kubectl", "kustomize", str(output)]
    if shutil.which("kubectl") is None:
        print(f"wrote {output}; render it with: {shlex.join(command)}")
        return 0
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
    rendered = output / "tiffin.yaml"
    rendered.write_text(done.stdout)
    print(f"wrote {rendered} ({args.overlay}, image {args.image}); apply it with:")
    print(shlex.join(["kubectl", "apply", "-f", str(rendered)]))
    return 0
