"""The `minillm` command.

    minillm --help
    minillm pretrain --model mini_deepseekv3              # tiny preset, built-in sample data, CPU-friendly
    accelerate launch --config_file accelerate_configs/ddp.yaml cli/main.py pretrain --model mini_llama3 ...

Each command group lives in its own module (`cli/<group>.py`) exposing `register(app)`; heavy imports (torch,
transformers) happen inside the commands so `minillm --help` stays fast. Errors the user can fix are raised as
`minillm.errors.UserError` and printed here as one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path (`accelerate launch cli/main.py ...`) from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer  # noqa: E402

# Building the commands reads `TrainConfig`, which imports the `minillm` package; keep that from registering the
# models (torch + transformers, seconds) for `minillm --help`. The app callback below registers them for commands.
os.environ["MINILLM_DEFER_MODELS"] = "1"
from cli import data, evaluate, export, info, serve, train  # noqa: E402

app = typer.Typer(
    name="minillm",
    help="Train small reproductions of Llama 3, DeepSeek-V3 and Qwen3-Next: tokenizer, data, pretrain, SFT, "
    "chat, serve, eval, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for module in (data, train, serve, evaluate, export, info):
    module.register(app)
del os.environ["MINILLM_DEFER_MODELS"]  # child processes (launchers, workers) import minillm normally


@app.callback()
def _before_any_command() -> None:
    """Runs before any command (not for `minillm --help`): registers our models with the Auto classes, checks the
    kernel-choice environment variables (a misspelt one is refused before the command writes anything), and turns
    off transformers' own tqdm bars ("Loading weights", "Writing model shards"), which would interleave with our
    rich output on every load and save; our long steps show their own progress bars. Without a GPU, DeepSpeed (which
    transformers and Accelerate import to unwrap a model being saved) is told it runs on the CPU, instead of
    warning that it found no GPU."""
    import torch
    from transformers.utils import logging as hf_logging

    import minillm.models  # noqa: F401  (registers our architectures with the Auto classes: deferred above)
    from minillm.models.layers.kernel_choice import check_environment

    check_environment()  # a misspelt MINILLM_ATTENTION_BACKEND / MINILLM_CPU_MATMUL: one line, before any output

    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning `UserError` and a bad command line (an unknown option, a
    value of the wrong type or out of range) into one line and exit code 2."""
    try:
        result = app(args=argv, prog_name="minillm", standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a training loop: no traceback
        sys.exit(130)
    except Exception as err:
        if _is_usage_error(err):
            if type(err).__name__ == "NoArgsIsHelpError":  # `minillm tokenizer`: the group's help, as click does
                # the error was built from the help text; typer's rich help printed itself then and left it ""
                text = err.format_message()
                if text.strip():
                    print(text, file=sys.stderr)
            else:
                print(f"error: {err.format_message()} (see `{_command_path(err, argv)} --help`)", file=sys.stderr)
            sys.exit(2)
        # Imported here, not at the top: importing `minillm` loads torch and the models, and `minillm --help`
        # should not pay for that. Any UserError was raised from inside minillm, so it is loaded by now.
        from minillm.errors import TrainingStopped, UserError

        if isinstance(err, TrainingStopped):
            print(err, file=sys.stderr)
            sys.exit(err.exit_code)
        if not isinstance(err, UserError):
            raise
        report_user_error(str(err))
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)  # click's own exit code (e.g. 0 after --help)


def _is_usage_error(err: Exception) -> bool:
    """Whether `err` is click's `UsageError` (an unknown command or option, a value of the wrong type or out of
    range, an option without its value). Matched by its shape: typer vendors its own copy of click in recent
    versions, so the class depends on the installed typer."""
    return getattr(err, "exit_code", None) == 2 and hasattr(err, "format_message") and any(
        cls.__name__ == "UsageError" for cls in type(err).__mro__
    )


def _command_path(err: Exception, argv: list[str] | None) -> str:
    """`minillm data sft`: the command the error is about, from click's context, or (for an option given without
    its value, which click's parser reports without one) from the words before the first option."""
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        return ctx.command_path
    words = []
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(["minillm", *words])


def report_user_error(message: str) -> None:
    """Print `error: message` once. Under `accelerate launch` every rank raises the same error, so only rank 0
    prints it. Under `--launcher` no rank prints: each leaves its message in the file the parent process names
    (rank 0 in that file, rank N in `<file>.rankN`), and the parent prints it instead of the launcher's own failure
    report, even when only another rank failed, and exits with 2 too (see `minillm.training.launch`). Rank 0 once
    printed it as well, so the same line appeared twice."""
    import os

    rank = os.environ.get("RANK", "0")
    error_file = os.environ.get("MINILLM_ERROR_FILE")
    if error_file:
        Path(error_file if rank == "0" else f"{error_file}.rank{rank}").write_text(message, encoding="utf-8")
    elif rank == "0":
        print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
