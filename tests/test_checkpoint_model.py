"""A checkpoint of a run is a model: `chat`, `serve`, `eval`, `sft --model-path` and `export` take it wherever they
take a model directory, and it holds exactly the weights the run had at that step.

The reference for "the weights of step 2" is a second run that stops at step 2: with a constant learning rate
(`--min-lr` = `--lr`, no warmup) the schedule does not depend on `--max-steps`, so that run's `final/` and the
step-2 checkpoint of a 3-step run hold the same weights, bit for bit. (The DeepSpeed and expert-parallel layouts
are checked against a one-process run in tests/test_launch_train.py and tests/test_expert_parallel_training.py.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import run_cli, run_cli_err
from train_helpers import build_shards

STEP_2 = "step_00000002"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a 2-step run, the step-2 checkpoint of a 3-step run, the token shards)."""
    base = tmp_path_factory.mktemp("checkpoint_model")
    shards = build_shards(base)
    common = ["pretrain", "--model", "mini_llama3", "--data", str(shards), "--seq-len", "32", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--model-arg", "num_hidden_layers=2", "--precision", "fp32", "--lr", "1e-3",
              "--min-lr", "1e-3", "--warmup-steps", "0", "--log-every", "1"]  # fmt: skip
    assert run_cli(*common, "--max-steps", "2", "--output-dir", str(base / "two")) == 0
    assert run_cli(*common, "--max-steps", "3", "--save-every", "2", "--output-dir", str(base / "three")) == 0
    return base / "two", base / "three" / "checkpoints" / STEP_2, shards


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_checkpoint_holds_the_model_of_its_step(runs):
    from transformers import AutoModelForCausalLM

    from minillm.models.export import load_causal_lm

    two, checkpoint, _ = runs
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    final = _state(AutoModelForCausalLM.from_pretrained(two / "final"))
    ours = load_causal_lm(checkpoint, torch.float32)
    assert not ours.training
    state = _state(ours)
    assert set(state) == set(final)
    for key in final:
        assert torch.equal(state[key], final[key]), key
    three_final = _state(AutoModelForCausalLM.from_pretrained(checkpoint.parents[1] / "final"))
    assert any(not torch.equal(three_final[k], final[k]) for k in final)  # step 3 moved on: the test can tell
    assert ours.generation_config.eos_token_id is not None


def test_eval_export_and_sft_take_a_checkpoint(runs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    two, checkpoint, shards = runs
    scores = {}
    for name, model in (("final", two / "final"), ("checkpoint", checkpoint)):
        out = tmp_path / f"{name}.json"
        assert run_cli("eval", "ppl", "--model", str(model), "--data", str(shards), "--limit", "4",
                       "--json", str(out)) == 0  # fmt: skip
        scores[name] = json.loads(out.read_text())["total"]
    assert scores["checkpoint"] == scores["final"]

    assert run_cli("export", str(checkpoint), str(tmp_path / "hf")) == 0
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    final = AutoModelForCausalLM.from_pretrained(two / "final")
    batch = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(reference(batch).logits, final(batch).logits, atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    assert run_cli("export", "--to", "minillm", str(checkpoint), str(tmp_path / "model")) == 0
    copy = _state(AutoModelForCausalLM.from_pretrained(tmp_path / "model"))
    assert all(torch.equal(copy[k], v) for k, v in _state(final).items())

    monkeypatch.chdir(tmp_path)  # the SFT run directory goes under ./runs
    assert run_cli("sft", "--model-path", os.path.relpath(checkpoint), "--max-steps", "1", "--seq-len", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "2") == 0  # fmt: skip
    (sft_run,) = (tmp_path / "runs").glob("sft_mini_llama3_*")
    assert (sft_run / "final" / "model.safetensors").is_file()
    # recorded as an absolute path: the record names the same model from any directory
    assert yaml.safe_load((sft_run / "config.yaml").read_text())["model_path"] == str(checkpoint)


def test_a_model_directory_with_another_trainers_state_is_no_checkpoint(runs, tmp_path):
    """A Hugging Face Trainer's `checkpoint-N/` holds a `trainer_state.json` too, beside an ordinary (here sharded)
    model directory: it loads through `from_pretrained`, and `export --to minillm` converts it."""
    from transformers import AutoModelForCausalLM

    from minillm.models.export import load_causal_lm
    from minillm.training.checkpoint import is_checkpoint

    two, checkpoint, _ = runs
    hf = tmp_path / "checkpoint-10"
    assert run_cli("export", str(two / "final"), str(tmp_path / "exported")) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported").save_pretrained(hf, max_shard_size="1MB")
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    assert is_checkpoint(checkpoint) and not is_checkpoint(hf)
    assert len(list(hf.glob("*.safetensors"))) > 1
    assert type(load_causal_lm(hf, torch.float32)).__name__ == "LlamaForCausalLM"
    assert run_cli("export", "--to", "minillm", str(hf), str(tmp_path / "back")) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "mini_llama3"


def test_sft_from_a_checkpoint_resumes_after_that_checkpoint_is_gone(runs, tmp_path, monkeypatch):
    """An SFT run started from a checkpoint that rotation later deletes still resumes: its own checkpoint holds the
    architecture and tokenizer, and its weights are the ones loaded anyway."""
    _, checkpoint, _ = runs
    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    monkeypatch.chdir(tmp_path)
    args = ["sft", "--max-steps", "3", "--save-every", "1", "--seq-len", "64", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--output-dir", "sft"]  # fmt: skip
    assert run_cli(*args, "--model-path", str(base)) == 0
    whole = (tmp_path / "sft" / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "sft" / "final")  # as if killed after its last checkpoint (step 2)
    shutil.rmtree(base)
    assert run_cli("sft", "--config", "sft/config.yaml", "--resume", "latest") == 0
    assert (tmp_path / "sft" / "final" / "model.safetensors").read_bytes() == whole


def test_the_served_name_of_a_checkpoint_names_its_run(runs):
    from minillm.inference.loading import model_display_name

    _, checkpoint, _ = runs
    assert model_display_name(checkpoint) == f"three/{STEP_2}"


@pytest.mark.parametrize("damage", ["truncated weights", "bad trainer state"])
def test_resuming_a_damaged_checkpoint_is_one_line_naming_an_earlier_one(runs, tmp_path, capsys, damage):
    """A truncated file or a hand-edited state raised from safetensors / json with a traceback."""
    run = tmp_path / "run"
    shutil.copytree(runs[1].parents[1], run)
    checkpoint = run / "checkpoints" / STEP_2
    if damage == "truncated weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (checkpoint / "trainer_state.json").write_text("{bad")
    saved_config = (run / "config.yaml").read_text()
    code, err = run_cli_err(["pretrain", "--config", str(run / "config.yaml"), "--resume", str(checkpoint),
                             "--log-every", "7"], capsys)
    assert code == 2, err
    assert f"--resume {checkpoint}: cannot read the checkpoint, it may be damaged (" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert (run / "config.yaml").read_text() == saved_config  # the refused launch's options are not recorded


def test_a_save_interrupted_midway_leaves_no_half_written_checkpoint(tmp_path, capsys):
    """A second Ctrl-C while a checkpoint is being written left `.tmp-step_N/` (GBs at base size) behind."""
    from accelerate import Accelerator

    from minillm.training import checkpoint as ckpt

    def interrupted(directory: Path) -> None:
        assert any(directory.iterdir())  # save_state has written its files
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(Accelerator(), tmp_path, 7, {}, keep_last=3, save_extra=interrupted)
    assert list((tmp_path / ckpt.CHECKPOINTS).iterdir()) == []
    assert "interrupted while saving the checkpoint of step 7: it was not kept" in capsys.readouterr().err


def _broken(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    """A copy of `checkpoint` (or of its run) damaged in one way."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parents[1], run, ignore=shutil.ignore_patterns("final"))
    copy = run / "checkpoints" / checkpoint.name
    if how == "unfinished run":
        return run
    if how == "older checkpoint":
        (copy / "config.json").unlink()
    elif how == "no weights":
        (copy / "model.safetensors").unlink()
    elif how == "other config":
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    elif how == "half the experts":
        (copy / "experts_ep01-of-02.safetensors").write_bytes(b"")
    return copy


@pytest.mark.parametrize(("how", "message"), [
    ("unfinished run", "the run has not finished (no final/); pass one of its checkpoints, the newest is "),
    ("older checkpoint", "a checkpoint saved by an older minillm (no config.json)"),
    ("no weights", "holds no model weights"),
    ("other config", "its weights do not match its config.json (missing model.layers.2."),
    ("half the experts", "incomplete expert shards (experts_ep01-of-02.safetensors; expected "
                         "experts_ep00-of-02.safetensors, experts_ep01-of-02.safetensors)"),
])  # fmt: skip
def test_a_bad_checkpoint_is_one_line_and_exit_2(runs, tmp_path, capsys, how, message):
    path = _broken(runs[1], tmp_path, how)
    for args in (["eval", "ppl", "--model", str(path), "--data", str(runs[2])],
                 ["export", str(path), str(tmp_path / "out")]):
        code, err = run_cli_err(args, capsys)
        assert code == 2, err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
        if how == "unfinished run":
            assert str(path / "checkpoints" / STEP_2) in err
    assert not (tmp_path / "out").exists()


def test_models_and_exports_are_readable_by_other_users(runs, tmp_path):
    """A run's model, its checkpoints and an export get the modes of the umask (0644 / 0755 under 022), not the
    0600 files of safetensors and the 0700 directories of mkdtemp: a server run under another account reads them."""
    two, checkpoint, _ = runs
    mask = os.umask(0o022)
    try:
        assert run_cli("export", str(two / "final"), str(tmp_path / "hf")) == 0
    finally:
        os.umask(mask)
    for root, umask in ((two / "final", mask), (checkpoint, mask), (tmp_path / "hf", 0o022)):
        for path in [root, *root.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
