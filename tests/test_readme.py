"""`scripts/readme_commands.py`: extracting the README's bash blocks and running the ones marked safe.

Tested on a README-like markdown written here; the last test runs the tool on the real README.md (skipped while
the README marks no block to run).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_commands", REPO / "scripts" / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(spec)
sys.modules["readme_commands"] = readme_commands  # dataclasses look their module up there
spec.loader.exec_module(readme_commands)

SAMPLE = """# A project

Install (never run by the test):

<!-- test: skip -->
```bash
pip install -e .
```

Make a file and check it, in a scratch directory that sees the repository's files:

<!-- test: run -->
```bash
echo hello > made_here.txt
test "$(cat made_here.txt)" = hello
test -f pyproject.toml
```

A Python example is not a shell block:

```python
raise SystemExit(1)
```

Covered elsewhere:
<!-- test: covered-by tests/test_readme.py -->
```sh
minillm something --expensive
```

  <!-- test: run timeout=30 -->
  ```bash
  echo indented block
  ```

```bash
exit 1
```
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_extract_blocks_reads_markers_languages_and_lines():
    blocks = readme_commands.extract_blocks(SAMPLE)
    assert [(b.line, b.language, b.marker) for b in blocks] == [
        (6, "bash", "skip"),
        (13, "bash", "run"),
        (27, "sh", "covered-by"),
        (32, "bash", "run"),
        (36, "bash", None),
    ]
    assert blocks[1].code.startswith("echo hello > made_here.txt\n") and blocks[1].code.count("\n") == 3
    assert blocks[2].argument == "tests/test_readme.py"
    assert blocks[3].options == {"timeout": "30"} and blocks[3].code == "echo indented block\n"


def test_marked_blocks_run_in_a_scratch_directory(tmp_path):
    lines: list[str] = []
    failures = readme_commands.check(write(tmp_path, SAMPLE), echo=lines.append)
    assert failures == 0, "\n".join(lines)
    assert [line.split()[0] for line in lines] == ["skip", "ok", "ok", "ok", "----"]
    assert not (tmp_path / "made_here.txt").exists() and not (REPO / "made_here.txt").exists()
    # strict mode: the unmarked block (`exit 1`) must be marked
    lines.clear()
    assert readme_commands.check(write(tmp_path, SAMPLE), strict=True, echo=lines.append) == 1
    assert "README.md:36 (block 5): no <!-- test" in lines[-1]


def test_failures_are_reported_with_their_output(tmp_path):
    text = (
        "<!-- test: run -->\n```bash\necho before\nfalse\necho never\n```\n\n"
        "<!-- test: covered-by tests/no_such_test.py -->\n```bash\nminillm x\n```\n"
        "<!-- test: run timeout=1 -->\n```bash\nsleep 5\n```\n"
    )
    lines: list[str] = []
    assert readme_commands.check(write(tmp_path, text), echo=lines.append) == 3
    report = "\n".join(lines)
    output = [line.strip() for line in report.splitlines()]
    assert "exit 1" in report and "before" in output and "never" not in output  # -e stops at `false`
    assert "tests/no_such_test.py', which does not exist" in report
    assert "exit 124" in report
    assert readme_commands.main([str(write(tmp_path, text)), "--only", "2"]) == 1
    assert readme_commands.main([str(tmp_path / "missing.md")]) == 2


def test_real_readme_marked_commands_pass():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md yet")
    blocks = readme_commands.extract_blocks(readme.read_text(encoding="utf-8"))
    if not any(b.marker in ("run", "covered-by") for b in blocks):
        pytest.skip("README.md marks no bash block with <!-- test: run --> or covered-by yet")
    lines: list[str] = []
    # strict: an unmarked bash block fails too, as `readme_commands.py --strict` (the README's own check) does
    assert readme_commands.check(readme, strict=True, echo=lines.append) == 0, "\n".join(lines)
