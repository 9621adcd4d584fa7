"""Running the `minillm` CLI inside the test process (fast: no interpreter start, no re-import of torch)."""

from __future__ import annotations

from cli.main import main


def run_cli(*argv: str) -> int:
    """Run `minillm ARGV...`; its exit code (0 when the command returns without calling `sys.exit`)."""
    try:
        main(list(argv))
    except SystemExit as exc:
        return exc.code or 0
    return 0


def run_cli_err(args: list[str], capsys) -> tuple[int, str]:
    """Run `minillm ARGS`; (exit code, what it wrote on stderr)."""
    code = run_cli(*args)
    return code, capsys.readouterr().err
