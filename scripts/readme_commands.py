"""Keep the README true: extract its ```bash blocks and run the ones marked safe to run.

    python scripts/readme_commands.py                 # run the blocks marked `run` in README.md
    python scripts/readme_commands.py --list          # show every bash block and its marker
    python scripts/readme_commands.py --strict        # also fail on bash blocks that carry no marker
    python scripts/readme_commands.py docs/other.md --only 3

Marking convention: an HTML comment (invisible on GitHub) on the line(s) right before a fenced bash block.

    <!-- test: run -->                        run it (in a scratch directory, see below); it must exit 0
    <!-- test: run timeout=900 -->            same, with a time limit in seconds (default 600)
    <!-- test: covered-by tests/test_x.py --> a test (or CI step) runs it; the named file must exist
    <!-- test: skip -->                       never run (installs, GPU launches, downloads); says so on purpose

Each `run` block executes with `bash -euo pipefail` in a fresh temporary directory holding a symlink to every
top-level entry of the repository (so `accelerate_configs/ddp.yaml` or `scripts/...` resolve) but not its outputs:
what a command writes (`runs/`, `data/`) lands in the scratch directory and is deleted afterwards. Blocks run in
order, each in its own directory, so every marked block must stand on its own.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LANGUAGES = ("bash", "sh", "shell")
MARKER = re.compile(r"<!--\s*test:\s*(run|skip|covered-by)\b(.*?)-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
DEFAULT_TIMEOUT = 600
NOT_LINKED = {"runs", "data", "build", "dist"}  # outputs: the scratch directory gets its own


@dataclass
class Block:
    """One fenced code block: where it starts (1-based line of the fence), its language, code and marker."""

    line: int
    language: str
    code: str
    marker: str | None = None  # "run", "skip", "covered-by" or None
    options: dict[str, str] = field(default_factory=dict)
    argument: str = ""  # the path of covered-by


def extract_blocks(markdown: str, languages: tuple[str, ...] = LANGUAGES) -> list[Block]:
    """The fenced blocks in `languages`, each with the marker comment found on the lines just above it."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language.lower() in languages:
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
            block = Block(line=i + 1, language=language.lower(), code="\n".join(body) + "\n")
            _attach_marker(block, lines, i)
            blocks.append(block)
        i = end + 1
    return blocks


def _attach_marker(block: Block, lines: list[str], fence_index: int) -> None:
    """Read the marker from the nearest non-blank line above the fence, if it is a test comment."""
    k = fence_index - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    found = MARKER.search(lines[k]) if k >= 0 else None
    if not found:
        return
    block.marker, rest = found.group(1), found.group(2).strip()
    if block.marker == "covered-by":
        block.argument = rest
    else:
        block.options = dict(item.split("=", 1) for item in rest.split() if "=" in item)


def scratch_dir(repo: Path, parent: Path) -> Path:
    """A temporary directory with a symlink to each top-level entry of `repo` (not hidden ones, not outputs)."""
    work = Path(tempfile.mkdtemp(prefix="readme-", dir=parent))
    for entry in repo.iterdir():
        if not entry.name.startswith(".") and entry.name not in NOT_LINKED:
            (work / entry.name).symlink_to(entry)
    return work


def run_block(block: Block, repo: Path = REPO, timeout: int | None = None) -> subprocess.CompletedProcess:
    """Run one block with bash -euo pipefail in a scratch directory; returns the finished process."""
    limit = timeout or int(block.options.get("timeout", DEFAULT_TIMEOUT))
    with tempfile.TemporaryDirectory(prefix="readme-commands-") as parent:
        work = scratch_dir(repo, Path(parent))  # removed with `parent`; symlinks are unlinked, never followed
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
        }
        try:
            return subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.code],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=limit,
            )
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return subprocess.CompletedProcess(err.cmd, 124, out, f"timed out after {limit} s")


def check(path: Path, strict: bool = False, only: int | None = None, repo: Path = REPO, echo=print) -> int:
    """Run the marked blocks of `path` (or block number `only`, 1-based); the number of failures."""
    blocks = extract_blocks(path.read_text(encoding="utf-8"))
    failures = 0
    for number, block in enumerate(blocks, start=1):
        if only is not None and number != only:
            continue
        where = f"{path}:{block.line} (block {number})"
        if block.marker == "run":
            started = time.perf_counter()
            result = run_block(block, repo)
            seconds = time.perf_counter() - started
            if result.returncode == 0:
                echo(f"ok    {where} in {seconds:.1f} s")
            else:
                failures += 1
                echo(f"FAIL  {where}: exit {result.returncode} after {seconds:.1f} s")
                echo(_indent("$ " + block.code.strip()))
                echo(_indent((result.stdout + result.stderr).strip()[-4000:]))
        elif block.marker == "covered-by":
            target = repo / block.argument
            if block.argument and target.exists():
                echo(f"ok    {where}: covered by {block.argument}")
            else:
                failures += 1
                echo(f"FAIL  {where}: covered-by names '{block.argument}', which does not exist")
        elif block.marker == "skip":
            echo(f"skip  {where}")
        elif strict:
            failures += 1
            echo(f"FAIL  {where}: no <!-- test: run|skip|covered-by PATH --> marker")
        else:
            echo(f"----  {where}: not marked")
    return failures


def _indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("markdown", nargs="?", type=Path, default=REPO / "README.md")
    parser.add_argument(
        "--list", action="store_true", help="List the bash blocks and their markers; run nothing."
    )
    parser.add_argument("--strict", action="store_true", help="Fail on bash blocks without a marker.")
    parser.add_argument("--only", type=int, help="Check only this block (1-based, as --list numbers them).")
    args = parser.parse_args(argv)
    if not args.markdown.is_file():
        print(f"error: {args.markdown}: no such file", file=sys.stderr)
        return 2
    if args.list:
        for number, block in enumerate(extract_blocks(args.markdown.read_text(encoding="utf-8")), start=1):
            first = block.code.strip().splitlines()[0] if block.code.strip() else ""
            print(f"{number:3d}  line {block.line:4d}  {block.marker or '-':10s}  {first}")
        return 0
    count = len(extract_blocks(args.markdown.read_text(encoding="utf-8")))
    if args.only is not None and not 1 <= args.only <= count:
        print(f"error: --only {args.only}: {args.markdown} has bash blocks 1 to {count} (--list shows them)",
              file=sys.stderr)
        return 2
    failures = check(args.markdown, strict=args.strict, only=args.only)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
