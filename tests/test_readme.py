"""The README's five-minute tour runs as it stands and prints what it says it prints.

The tour's ```python and ```sh blocks run in order, as a reader pastes them: the Python ones
into one interactive session (`code.InteractiveConsole`, fed line by line, so a block that
a real session would reject fails here too), the shell ones through `sh` when curl exists.
The README's addresses (localhost:8001 and localhost:8000) are replaced with the test server's
free ports; nothing else in a block is changed.

Conventions in README.md (Markdown comments are invisible once rendered):
  - A ```text block after a code block is what that block prints. Whitespace does not count
    (so long lines may be wrapped), numbers are compared with a tolerance, and `...` stands
    for anything (a path that differs by machine).
  - `<!-- tests/test_readme.py: not run (why) -->` before a code block: not run here.
  - `<!-- tests/test_readme.py: output without PyTorch -->` before a second ```text block:
    what the code block prints when the server has no PyTorch, as after the README's first
    command, which installs none (the unmarked block is the output with PyTorch).

The tour runs twice: against the example server as the test suite runs it (PyTorch is
installed), and against one started with PyTorch hidden: a PYTHONPATH entry holding a
`torch.py` that raises ImportError, for the server, its workers and the tour's session alike.
That is what the torch backend sees when PyTorch is not installed (backends/torch.py turns the
ImportError into the reason `classifier_torch` is UNAVAILABLE).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, ServerProcess

README = ROOT / "README.md"
MARK = "<!-- tests/test_readme.py: "
NOT_RUN = MARK + "not run"
WITHOUT_TORCH = MARK + "output without PyTorch -->"
RUN = ("python", "sh")

# How far a printed number may stray from the README's: float32 results of the same model may
# differ in their last digits between CPUs and library versions, never by this much.
REL_TOL = 1e-4
ABS_TOL = 1e-6


@dataclass
class Block:
    """One fenced code block of the tour, with the outputs README shows for it."""

    language: str
    source: str
    line: int
    skipped: bool = False
    output: str | None = None  # with PyTorch (and without, unless `output_without_torch`)
    output_without_torch: str | None = None


FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def tour_text() -> tuple[str, int]:
    """The section `## Five-minute tour`, up to the next `## ` heading, and its first line."""
    text = README.read_text()
    start = text.index("\n## Five-minute tour\n") + 1
    end = text.index("\n## ", start)
    return text[start:end], text.count("\n", 0, start) + 1


@cache
def tour() -> tuple[Block, ...]:
    """The tour's code blocks, each with the ```text blocks that follow it."""
    text, first_line = tour_text()
    blocks: list[Block] = []
    for fence in FENCE.finditer(text):
        language, body = fence.group(1), fence.group(2)
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = first_line + text.count("\n", 0, fence.start())
        if language == "text":
            assert blocks and blocks[-1].language in RUN, f"README.md:{line}: output of what?"
            owner = blocks[-1]
            if before == WITHOUT_TORCH:
                assert owner.output_without_torch is None, f"README.md:{line}: a second one"
                owner.output_without_torch = body
            else:
                assert owner.output is None, f"README.md:{line}: a second output, unmarked"
                owner.output = body
        elif language in RUN:
            skipped = before.startswith(NOT_RUN)
            blocks.append(Block(language, body, line, skipped))
        # Other blocks (the repository's layout, a log, YAML) are illustrations.
    return tuple(blocks)


def to_run(blocks: tuple[Block, ...]) -> list[Block]:
    """The blocks a test runs: all but those marked not run, and shell blocks only with curl."""
    return [b for b in blocks if not b.skipped and (b.language == "python" or shutil.which("curl"))]


# ---- comparing what was printed with what README shows ----------------------------------------

NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
TOKEN = re.compile(rf"\.\.\.|{NUMBER}|\w+|\S")


def tokens(text: str) -> list[str | float]:
    """Words, numbers (as floats) and single punctuation marks; whitespace dropped."""
    found: list[str | float] = []
    for token in TOKEN.findall(text):
        found.append(float(token) if re.fullmatch(NUMBER, token) else token)
    return found


def matches(expected: str, actual: str) -> bool:
    """`actual` is what `expected` shows: the same tokens, numbers within tolerance, `...`
    standing for any run of tokens."""
    want, got = tokens(expected), tokens(actual)

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(got)
        if want[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        if j == len(got):
            return False
        w, g = want[i], got[j]
        if isinstance(w, float) and isinstance(g, float):
            same = math.isclose(w, g, rel_tol=REL_TOL, abs_tol=ABS_TOL)
        else:
            same = w == g
        return same and match(i + 1, j + 1)

    return match(0, 0)


def test_matching_ignores_layout_and_rounding_but_not_values():
    assert matches("[[0.07647845 0.19202663]\n [1.0 2]]", "[[0.07647846 0.19202663] [1. 2.]]")
    assert matches("(.../config.yaml (version 1): needs", "(/a/b/config.yaml (version 1): needs")
    assert not matches("[0.07647845 0.19202663]", "[0.046477526 0.95265299]")
    assert not matches("version 1", "version 2")
    assert not matches("True", "True\nFalse")
    assert not matches("Request for model", "Request for unknown model")


# ---- running the tour ----------------------------------------------------------------------------

# The tour's session: one interactive console for the Python blocks, fed line by line, a blank
# line after each block as a reader's paste ends; shell blocks through sh. A separator line
# before each block splits the output. Tracebacks go to stdout too: a reader sees them.
SEPARATOR = "----- tests/test_readme.py block "
SESSION = f"""
import code, json, subprocess, sys
sys.stderr = sys.stdout
console = code.InteractiveConsole()
for index, (language, source) in enumerate(json.load(sys.stdin)):
    print({SEPARATOR!r} + str(index), flush=True)
    if language == "sh":
        done = subprocess.run(["sh", "-c", source], stdout=sys.stdout, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode:  # curl's progress meter on stderr is noise; its errors are not
            print(done.stderr, "exit status", done.returncode)
        continue
    for line in source.splitlines():
        console.push(line)
    console.push("")
"""


# The README's addresses, each with the ServerProcess attribute whose address replaces it.
README_ADDRESSES = {
    "localhost:8001": "url",
    "localhost:8000": "http_url",
    "127.0.0.1:8001": "url",
    "127.0.0.1:8000": "http_url",
}


def substituted(text: str, server: ServerProcess) -> str:
    """`text` with the README's addresses replaced by the test server's."""
    for readme, attribute in README_ADDRESSES.items():
        text = text.replace(readme, getattr(server, attribute))
    return text


def run_tour(blocks: list[Block], server: ServerProcess, env: dict[str, str]) -> list[str]:
    """Runs the blocks in one session against `server`; what each printed."""
    sources = [(b.language, substituted(b.source, server)) for b in blocks]
    done = subprocess.run(
        [sys.executable, "-u", "-c", SESSION],
        input=json.dumps(sources),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = re.split(rf"{re.escape(SEPARATOR)}\d+\n", done.stdout)
    assert printed[0] == "" and len(printed) == len(blocks) + 1, done.stdout
    return printed[1:]


def check_tour(server: ServerProcess, with_torch: bool, env: dict[str, str]) -> None:
    blocks = to_run(tour())
    printed = run_tour(blocks, server, env)
    for block, actual in zip(blocks, printed, strict=True):
        shown = block.output
        if not with_torch and block.output_without_torch is not None:
            shown = block.output_without_torch
        assert shown is not None
        expected = substituted(shown, server)
        assert matches(expected, actual), (
            f"README.md:{block.line}: the {block.language} block printed\n{actual}\n"
            f"where README shows\n{expected}"
        )
    if not shutil.which("curl"):
        pytest.skip("curl is not installed: the tour's Python ran, its curl lines did not")


def test_every_block_of_the_tour_runs_or_says_why_not():
    blocks = tour()
    assert [b.language for b in blocks if not b.skipped].count("python") >= 5
    assert any(b.language == "sh" and not b.skipped for b in blocks)  # curl
    for block in blocks:
        if block.skipped:
            assert block.output is None, f"README.md:{block.line}: output of a block not run"
        else:
            assert block.output is not None, f"README.md:{block.line}: no ```text after it"
    # Every README address a block uses is one the tests replace.
    text, _ = tour_text()
    for fence in FENCE.finditer(text):
        used = re.findall(r"(?:localhost|127\.0\.0\.1):\d+", fence.group(2))
        assert set(used) <= set(README_ADDRESSES), used


def test_tour_with_pytorch(example_server):
    check_tour(example_server, with_torch=True, env={})


def hidden_torch(folder: Path) -> dict[str, str]:
    """Environment variables under which `import torch` fails as it does where PyTorch is not
    installed: a `torch.py` in `folder`, first on PYTHONPATH, raising ModuleNotFoundError."""
    (folder / "torch.py").write_text(
        'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'
    )
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    hidden = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True
    )
    assert b"No module named 'torch'" in hidden.stderr, "torch is still importable"
    return env


@pytest.fixture(scope="module")
def server_without_torch(tmp_path_factory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """The example repository served where PyTorch cannot be imported, and the environment
    variables that hide it (for the tour's session too)."""
    env = hidden_torch(tmp_path_factory.mktemp("no_torch"))
    server = ServerProcess(EXAMPLES, env=env)
    yield server, env
    assert server.stop() == 0, server.log()


def test_tour_without_pytorch(server_without_torch):
    server, env = server_without_torch
    check_tour(server, with_torch=False, env=env)


def test_serve_log_without_pytorch_is_as_shown(server_without_torch):
    server, _ = server_without_torch
    text, _ = tour_text()
    (excerpt,) = [f.group(2) for f in FENCE.finditer(text) if "INFO tiffin.serve:" in f.group(2)]
    # One log line per entry; an indented line continues the entry above it (wrapped).
    entries = re.split(r"\n(?=\S)", substituted(excerpt, server).strip())
    logged = [line.split(" ", 2)[-1] for line in server.log().splitlines()]  # no timestamp
    for entry in entries:
        assert any(matches(entry, line) for line in logged), f"{entry}\nnot in\n{server.log()}"
