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

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from minillm.errors import UserError

MAIN_SCRIPT = Path(__file__).resolve().parent.parent.parent / "cli" / "main.py"
LAUNCHED_ENV = "MINILLM_LAUNCHED"


def read_launcher(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The accelerate config as a dict (DeepSpeed file path made absolute) and its own path."""
    cfg_path = Path(path)
    if not cfg_path.is_file():
        shipped = Path(__file__).resolve().parent.parent.parent / "accelerate_configs" / cfg_path.name
        if not shipped.is_file():
            raise UserError(f"--launcher {path}: no such accelerate config file")
        cfg_path = shipped
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--launcher {cfg_path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--launcher {cfg_path}: expected an accelerate config mapping")
    ds = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds:
        candidates = [Path(ds), cfg_path.parent / ds, cfg_path.parent.parent / ds]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"--launcher {cfg_path}: deepspeed_config_file {ds} does not exist")
        data["deepspeed_config"]["deepspeed_config_file"] = str(found.resolve())
    return data, cfg_path


def check_world(launcher_cfg: dict[str, Any], micro_batch_size: int, global_batch_size: int) -> None:
    """Refuse a global batch that does not split evenly into micro-batches over the launcher's processes."""
    world = int(launcher_cfg.get("num_processes", 1) or 1)
    if global_batch_size % (world * micro_batch_size):
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by processes x micro batch size "
            f"= {world} x {micro_batch_size}"
        )


def relaunch(launcher: str, argv: list[str]) -> int:
    """Run `minillm <argv>` under `accelerate launch --config_file <launcher>`; returns its exit code."""
    data, _ = read_launcher(launcher)
    with tempfile.TemporaryDirectory(prefix="minillm-launch-") as tmp:
        resolved = Path(tmp) / "accelerate_config.yaml"
        resolved.write_text(yaml.safe_dump(data), encoding="utf-8")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolved),
               str(MAIN_SCRIPT), *argv]
        env = {**os.environ, LAUNCHED_ENV: "1"}
        if data.get("distributed_type") == "DEEPSPEED":
            env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
        return subprocess.run(cmd, env=env).returncode


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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
