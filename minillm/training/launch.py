"""`--launcher accelerate_configs/X.yaml`: re-run the same command under `accelerate launch`.

    minillm pretrain --launcher accelerate_configs/ddp.yaml --config recipes/pretrain_llama3_base.yaml
    # is the same as
    accelerate launch --config_file accelerate_configs/ddp.yaml cli/main.py pretrain --config ...

The parent process checks what it can before spawning workers (the launcher file exists, its DeepSpeed file
exists, the global batch divides over its process count), so those mistakes give one line instead of one traceback
per rank. A relative `deepspeed_config_file` is looked up from the current directory, then next to the accelerate
config and one level up (the repository root), so the shipped configs work from any directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from minillm.errors import UserError
from minillm.training.config import yaml_problem

MAIN_SCRIPT = Path(__file__).resolve().parent.parent.parent / "cli" / "main.py"
LAUNCHED_ENV = "MINILLM_LAUNCHED"
ERROR_FILE_ENV = "MINILLM_ERROR_FILE"  # where the ranks leave the message of a UserError for `relaunch`


def read_launcher(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The accelerate config as a dict (DeepSpeed file path made absolute) and its own path."""
    cfg_path = Path(path)
    if cfg_path.is_dir():
        raise UserError(f"--launcher {path}: a directory; give an accelerate config file (accelerate_configs/*.yaml)")
    if not cfg_path.is_file():
        # the shipped configs are found from any directory, named as the README does (`accelerate_configs/ddp.yaml`)
        # or alone (`ddp.yaml`); a path anywhere else names a file of the user's, which must exist
        shipped = Path(__file__).resolve().parent.parent.parent / "accelerate_configs" / cfg_path.name
        if cfg_path.parent not in (Path("."), Path("accelerate_configs")) or not shipped.is_file():
            raise UserError(f"--launcher {path}: no such accelerate config file")
        cfg_path = shipped
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"--launcher {cfg_path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise UserError(f"--launcher {cfg_path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"--launcher {cfg_path}: expected an accelerate config mapping")
    check_launcher_fields(data, cfg_path)
    ds = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds:
        candidates = [Path(ds), cfg_path.parent / ds, cfg_path.parent.parent / ds]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"--launcher {cfg_path}: deepspeed_config_file {ds} does not exist")
        data["deepspeed_config"]["deepspeed_config_file"] = str(found.resolve())
    return data, cfg_path


def check_launcher_fields(data: dict[str, Any], cfg_path: Path) -> None:
    """The fields minillm reads from an accelerate config, checked before anything is spawned: a recipe passed as
    --launcher by mistake, or a typo'd value, would otherwise surface as a traceback from accelerate."""
    from accelerate.utils import DistributedType

    if "distributed_type" not in data:
        raise UserError(f"--launcher {cfg_path}: not an accelerate config (no distributed_type); a training recipe "
                        "goes to --config")
    kinds = [kind.value for kind in DistributedType]
    if str(data["distributed_type"]).upper() not in kinds:
        raise UserError(f"--launcher {cfg_path}: distributed_type {data['distributed_type']!r} is not one of "
                        f"{', '.join(kinds)}")
    for key in ("num_processes", "num_machines", "main_process_port"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"--launcher {cfg_path}: {key} must be a positive integer, got {value!r}")


def check_world(launcher_cfg: dict[str, Any], micro_batch_size: int, global_batch_size: int) -> None:
    """Refuse a global batch that does not split evenly into micro-batches over the launcher's processes."""
    world = int(launcher_cfg.get("num_processes", 1) or 1)
    if global_batch_size % (world * micro_batch_size):
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by processes x micro batch size "
            f"= {world} x {micro_batch_size}"
        )


def fill_deepspeed_config(ds: dict[str, Any], config, world: int, name: str) -> None:
    """Fill the DeepSpeed config's "auto" batch/accumulation/clipping values from the recipe (in place), and refuse
    any value, precision included, that contradicts it: the recipe is the one source of truth."""
    from minillm.training.trainer import resolve_precision

    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.global_batch_size // (world * config.micro_batch_size),
        "train_batch_size": config.global_batch_size,
        "gradient_clipping": config.max_grad_norm,
    }
    for key, value in wanted.items():
        current = ds.get(key, "auto")
        if current == "auto":
            ds[key] = value
        elif isinstance(current, bool) or not isinstance(current, (int, float)):
            raise UserError(f"{name}: {key}={current!r} is not a number; set it to \"auto\"")
        elif float(current) != float(value):
            raise UserError(f"{name}: {key}={current} contradicts the recipe ({value}); set it to \"auto\"")
    precision = resolve_precision(config.precision, deepspeed=True)
    for section, dtype in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):  # DeepSpeed reads both bf16 names
        enabled = (ds.get(section) or {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == dtype):
            raise UserError(
                f"{name}: {section}.enabled={enabled} contradicts the recipe (precision={config.precision}); set it "
                "to \"auto\""
            )
    check_skips_nonfinite(ds, precision, name)


def check_skips_nonfinite(ds: dict[str, Any], precision: str, name: str) -> None:
    """Refuse a DeepSpeed setup whose engine would apply a step with non-finite gradients (`precision`: Accelerate's
    mixed_precision value, which "auto" dtypes follow).

    The trainer skips a non-finite step under DeepSpeed through the engine's own overflow check (see
    `minillm.training.trainer`). DeepSpeed 0.19 runs it with fp16 loss scaling, in ZeRO-3 always, in bf16 without
    ZeRO, and in ZeRO-1/2 on the gradients in bf16 (unless `bf16.check_grad_overflow` is false) or on their norm in
    fp32 (unless `zero_optimization.compute_grad_norm` is false); fp32 without ZeRO and those two opt-outs apply
    NaN gradients to the weights.
    """
    def enabled(section: dict[str, Any], dtype: str) -> bool:
        value = section.get("enabled", "auto")
        return precision == dtype if value == "auto" else bool(value)

    bf16 = ds.get("bf16") or ds.get("bfloat16") or {}
    if enabled(ds.get("fp16") or {}, "fp16"):
        return
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    stage = 0 if stage == "auto" else int(stage)
    if stage == 0 and not enabled(bf16, "bf16"):
        raise UserError(f"{name}: DeepSpeed without ZeRO in fp32 cannot skip a step with a non-finite loss; set "
                        "zero_optimization.stage to 1, 2 or 3")
    if stage in (1, 2):  # the check runs on the gradients (bf16 opt-out) or on their norm (fp32)
        if enabled(bf16, "bf16"):
            option = "bf16.check_grad_overflow" if bf16.get("check_grad_overflow") is False else None
        else:
            zero = ds.get("zero_optimization") or {}
            option = "zero_optimization.compute_grad_norm" if zero.get("compute_grad_norm") is False else None
        if option:
            raise UserError(f"{name}: {option}=false makes DeepSpeed apply non-finite gradients, but a step with a "
                            "non-finite loss must be skipped; remove it")


def check_deepspeed_file(launcher_cfg: dict[str, Any], config) -> None:
    """Before spawning: the launcher's DeepSpeed file must agree with the recipe (see `fill_deepspeed_config`)."""
    import json

    path = (launcher_cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not path:
        return
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{path}: not a readable DeepSpeed JSON config ({err})") from None
    fill_deepspeed_config(ds, config, int(launcher_cfg.get("num_processes", 1) or 1), path)


def launch_facts(launcher_cfg: dict[str, Any]) -> tuple[int, bool, int | None]:
    """(processes, DeepSpeed?, ZeRO stage) of an accelerate config, for checks before spawning."""
    import json

    world = int(launcher_cfg.get("num_processes", 1) or 1)
    uses_deepspeed = str(launcher_cfg.get("distributed_type", "")).upper() == "DEEPSPEED"
    ds_cfg = launcher_cfg.get("deepspeed_config") or {}
    stage = ds_cfg.get("zero_stage")
    if ds_cfg.get("deepspeed_config_file"):
        try:
            ds = json.loads(Path(ds_cfg["deepspeed_config_file"]).read_text(encoding="utf-8"))
            stage = ds.get("zero_optimization", {}).get("stage", stage)
        except (OSError, ValueError):
            pass  # reported by check_deepspeed_file
    return world, uses_deepspeed, int(stage) if uses_deepspeed and stage not in (None, "auto") else None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def relaunch(launcher: str, argv: list[str]) -> int:
    """Run `minillm <argv>` under `accelerate launch --config_file <launcher>`; returns its exit code."""
    data, _ = read_launcher(launcher)
    port = data.get("main_process_port")
    if port and int(data.get("num_machines", 1) or 1) == 1 and not _port_free(int(port)):
        data["main_process_port"] = _free_port()  # another job on this machine holds the configured port
    with tempfile.TemporaryDirectory(prefix="minillm-launch-") as tmp:
        resolved = Path(tmp) / "accelerate_config.yaml"
        resolved.write_text(yaml.safe_dump(data), encoding="utf-8")
        # --quiet: no traceback of accelerate's own about the failed child of a single-process launch; torchrun's
        # report of a multi-process one is held back below
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(resolved),
               str(MAIN_SCRIPT), *argv]
        error_file = Path(tmp) / "error.txt"  # ranks write a UserError's message here (cli/main.py)
        env = {**os.environ, LAUNCHED_ENV: "1", ERROR_FILE_ENV: str(error_file)}
        if data.get("distributed_type") == "DEEPSPEED":
            env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
        with _interrupts_recorded() as interrupts, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as child:
            report = _pass_stderr_until_failure_report(child.stderr)
            code = child.wait()
        message = ranks_error(error_file) if code != 0 else None
        if message is not None:
            # torchrun turned the ranks' exit code 2 into 1: the ranks left their one line to say here, with the code
            # that means "bad input", instead of torchrun's report of a failed child (40 lines, a traceback)
            print(f"error: {message}", file=sys.stderr)
            return 2
        stopped = _DEATH_SIGNAL.search(report)
        if code != 0 and (interrupts or stopped):
            # Ctrl-C (or a scheduler's signal) reached the launcher and the ranks: the ranks said what they did with
            # the step; torchrun's report of it is a traceback of its own, not a failure of the run
            number = int(stopped.group(1)) if stopped else signal.SIGINT
            print(f"stopped by {signal.Signals(number).name}: the run goes on from its newest checkpoint "
                  "(`minillm info RUN_DIR` gives the command)", file=sys.stderr)
            return 128 + number
        sys.stderr.buffer.write(report)  # a crash: everything torchrun says about it
        sys.stderr.flush()
        return code


# torch's elastic agent, told to stop ("... Received 2 death signal, shutting down workers")
_DEATH_SIGNAL = re.compile(rb"Received (\d+) death signal")


@contextlib.contextmanager
def _interrupts_recorded() -> Iterator[list[int]]:
    """While the launched command runs, Ctrl-C only notes itself here: the terminal sends it to the launcher and the
    ranks as well (one process group), and they stop on it. Raising KeyboardInterrupt instead would leave at once,
    while the ranks are still saying how they stopped, and close the pipe their messages come through."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.signal(signal.SIGINT, lambda number, frame: seen.append(number))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


# A log line of torch's elastic agent ("W1129 23:11:43.992000 15278 .../torch/distributed/elastic/...] Sending
# process 15283 closing signal SIGTERM"): it starts its report of a failed child, which a traceback follows.
_ELASTIC_LOG = re.compile(rb"^[WE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")  # not INFO (LOGLEVEL)


def _pass_stderr_until_failure_report(stream: IO[bytes]) -> bytes:
    """Copy the launched command's stderr to ours, line by line, until torch's elastic agent starts reporting a
    failed child; return that report and whatever follows, for the caller to print or drop."""
    held: list[bytes] = []
    for line in stream:
        if held or _ELASTIC_LOG.match(line):
            held.append(line)
            continue
        sys.stderr.buffer.write(line)
        sys.stderr.flush()
    return b"".join(held)


def ranks_error(error_file: Path) -> str | None:
    """The UserError message the ranks left (cli/main.py `report_user_error`): rank 0's, else the lowest rank's
    (prefixed with its rank, since rank 0 did not see it), else None."""
    if error_file.is_file():
        return error_file.read_text(encoding="utf-8")
    others = sorted(error_file.parent.glob(f"{error_file.name}.rank*"), key=lambda p: int(p.name.rsplit("rank", 1)[1]))
    if not others:
        return None
    rank = others[0].name.rsplit("rank", 1)[1]
    return f"(rank {rank}) {others[0].read_text(encoding='utf-8')}"


def strip_launcher(argv: list[str]) -> list[str]:
    """`argv` without `--launcher X` / `--launcher=X`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--launcher":
            skip = True
            continue
        if arg.startswith("--launcher="):
            continue
        out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
