"""The README's Python examples run as written.

Every fenced ```python block of README.md is a complete program: this test
writes each one to a file in a fresh temporary directory and runs it there
with this interpreter, in its own process (multi-rank examples spawn their
workers with ``loom.comms.testing.run_distributed`` under a ``__main__``
guard, which needs a real script file). Blocks in other languages (bash,
toml, text) are not run. Up to two blocks run at once, each in its own
subprocess; a failing block's test shows the tail of its stderr.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK_TIMEOUT_S = 180
PARALLEL = 2
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    line: int          # 1-based README line of the opening fence
    heading: str       # the nearest heading above it
    lang: str
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.heading).strip("-").lower()[:40]
        return f"L{self.line}-{slug}"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text (indented fences inside lists too),
    with the heading above it; headings inside fences do not count."""
    blocks: list[Block] = []
    heading = "(top)"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip().replace("`", "")
            i += 1
            continue
        start, indent, ticks = i, m["indent"], m["ticks"]
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip() == ticks and lines[i].startswith(indent)):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: code fence never closed")
        info = m["info"].strip().split()
        blocks.append(Block(start + 1, heading, info[0] if info else "", textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


PYTHON_BLOCKS = [b for b in parse_blocks(README.read_text(encoding="utf-8")) if b.lang == "python"]


def test_parser_sees_every_fence():
    text = "# A\n```python\nx = 1\n```\n- item\n  ```python\n  y = 2\n  ```\n## B `c`\n```text\n# not a heading\n```\n"
    blocks = parse_blocks(text)
    assert [(b.line, b.heading, b.lang, b.code) for b in blocks] == [
        (2, "A", "python", "x = 1\n"), (6, "A", "python", "y = 2\n"), (10, "B c", "text", "# not a heading\n")]
    assert len(PYTHON_BLOCKS) >= 10, "README.md lost its Python examples (or the parser broke)"


def _run_block(block: Block, workdir: Path) -> subprocess.CompletedProcess:
    script = workdir / f"readme_L{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)      # loom is installed; the example must not rely on the checkout
    try:
        return subprocess.run([sys.executable, script.name], check=False, cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return subprocess.CompletedProcess(exc.cmd, -1, out, err + f"\n(timed out after {BLOCK_TIMEOUT_S} s)")


@pytest.fixture(scope="module")
def readme_runs(request, tmp_path_factory):
    """Start every selected block at once on a pool of PARALLEL threads; each
    test then waits for its own block's result."""
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "callspec", None) is not None and item.path == request.path
                and "block" in item.callspec.params]
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    futures: dict[int, Future] = {
        b.line: pool.submit(_run_block, b, tmp_path_factory.mktemp(f"readme_L{b.line}")) for b in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(BLOCK_TIMEOUT_S * len(PYTHON_BLOCKS) + 60)
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_readme_python_block_runs(block, readme_runs):
    proc = readme_runs[block.line].result()
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        pytest.fail(f"README.md:{block.line} (under '{block.heading}') exited with {proc.returncode}:\n"
                    f"--- stdout (tail) ---\n{proc.stdout[-2000:]}\n--- stderr (tail) ---\n{tail}",
                    pytrace=False)
