"""The training loop in one process: loss normalisation, pretrain -> SFT for every model, non-finite steps, resume
after SIGKILL, and every bad input (one line, exit code 2, nothing written or overwritten)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import cli_helpers
import pytest
import torch
from cli_helpers import run_cli_err as run_cli
from train_helpers import (
    ROOT,
    build_shards,
    kill_after_step,
    relative_error,
    start,
    step_gradients,
    trainer_step,
    write_text_corpus,
)
from train_helpers import (
    logged_losses as losses,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shards(tmp_path_factory.mktemp("shards"))


def test_a_run_being_written_by_another_process_is_not_overwritten_or_resumed(tmp_path, capsys):
    """A second `pretrain --overwrite` into a live run moved its checkpoints aside and interleaved the two runs'
    metrics. The training process holds the run directory's lock until it ends (here: taken by the test)."""
    from cli_helpers import run_cli_err

    from minillm.runs import lock_run_dir

    run_dir = tmp_path / "run"
    args = ["pretrain", "--model", "mini_llama3", "--max-steps", "2", "--save-every", "1", "--model-arg",
            "num_hidden_layers=1", "--output-dir", str(run_dir)]
    assert run_cli_err(args, capsys)[0] == 0
    shutil.rmtree(run_dir / "final")  # a run still training has no final model
    before = sorted(p.name for p in run_dir.iterdir())
    lock = lock_run_dir(run_dir)
    for extra in (["--overwrite"], ["--resume", "latest"]):
        code, err = run_cli_err(args + extra, capsys)
        assert code == 2, err
        assert f"{run_dir}: another training process (pid {os.getpid()}) is writing this run" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    lock.close()
    assert run_cli_err(args + ["--overwrite"], capsys)[0] == 0  # released: the run may be replaced


def test_overwrite_moves_the_old_run_aside_whole_before_the_new_one_starts(tmp_path, monkeypatch, capsys):
    """`--overwrite` once cleared the old run in place before the first step: a new run that then failed deleted
    the old metrics and left the old final model under the new run's config. The old run now moves whole into
    `<dir>.previous-<time>`, loadable as it was, whatever becomes of the new one."""
    from cli_helpers import run_cli_err

    run_dir = tmp_path / "run"
    args = ["pretrain", "--model", "mini_llama3", "--max-steps", "2", "--save-every", "1", "--model-arg",
            "num_hidden_layers=1", "--output-dir", str(run_dir)]
    assert run_cli_err(args, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "final").iterdir()}
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    monkeypatch.setenv("MINILLM_TEST_NONFINITE_STEPS", "1")  # the new run diverges at its first step
    code, err = run_cli_err(args + ["--overwrite", "--max-bad-steps", "1", "--lr", "1e-3"], capsys)
    assert code == 2 and "non-finite loss" in err, err
    (aside,) = tmp_path.glob("run.previous-*")
    assert {p.name: p.read_bytes() for p in (aside / "final").iterdir()} == before
    assert (aside / "metrics.jsonl").read_text() == old_metrics and (aside / "loss_curve.png").is_file()
    assert "lr: 0.001" not in (aside / "config.yaml").read_text()
    assert (aside / "checkpoints" / "step_00000001").is_dir()
    assert not (run_dir / "final").exists() and "lr: 0.001" in (run_dir / "config.yaml").read_text()
    monkeypatch.delenv("MINILLM_TEST_NONFINITE_STEPS")
    code, err = run_cli_err(args + ["--overwrite"], capsys)  # the failed run is moved aside in turn
    assert code == 0, err
    assert len(list(tmp_path.glob("run.previous-*"))) == 2 and (run_dir / "final" / "config.json").is_file()


def test_a_default_run_directory_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys):
    """Without --output-dir the run goes to runs/<stage>_<model>_<time>: a `runs` file in the way raised
    NotADirectoryError with a traceback."""
    from cli_helpers import run_cli_err

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("user data")
    code, err = run_cli_err(["pretrain", "--model", "mini_llama3", "--max-steps", "1", "--model-arg",
                             "num_hidden_layers=1"], capsys)
    assert code == 2, err
    assert "error: run directory " in err and "runs is a file, not a directory" in err, err
    assert (tmp_path / "runs").read_text() == "user data"


def test_accumulation_gives_the_gradient_of_the_whole_batch():
    """Rows with uneven target counts: 1 x accumulation 4 == 1 x one batch of 16 (normalised by global targets)."""
    big = step_gradients(global_batch=16, micro_batch=16)
    accumulated = step_gradients(global_batch=16, micro_batch=4)
    assert relative_error(accumulated, big) <= 1e-5
    assert max(g.abs().max().item() for g in big.values()) > 0



def test_mixed_precision_backward_keeps_the_models_fp32_regions_in_fp32():
    """bf16 autocast covers the forward only. The backward of what a model computes in fp32 on purpose (Gated
    DeltaNet's recurrence runs with autocast off) must stay fp32: the trainer's gradients are those of a backward
    outside autocast, not of one inside it, which runs that region's batched matmuls in bf16."""
    from minillm.models.registry import build_model
    from minillm.training.config import TrainConfig
    from minillm.training.trainer import forward_backward, make_accelerator

    def fresh_model():
        torch.manual_seed(0)
        return build_model("mini_qwen3_next", "tiny", vocab_size=256, num_hidden_layers=1)

    ids = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))

    def manual_gradients(backward_under_autocast: bool) -> dict[str, torch.Tensor]:
        model = fresh_model()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if backward_under_autocast:
                loss.backward()
        if not backward_under_autocast:
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    config = TrainConfig(stage="pretrain", model="mini_qwen3_next", seq_len=128, micro_batch_size=2,
                         global_batch_size=2, precision="bf16", max_grad_norm=0.0).resolve()
    accelerator = make_accelerator(config)
    model = fresh_model()
    result = forward_backward(accelerator, model, [{"input_ids": ids, "labels": ids}])
    assert not result.skipped
    trained = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    outside, inside = manual_gradients(False), manual_gradients(True)
    assert relative_error(inside, outside) > 1e-3  # the test can tell the two apart
    assert relative_error(trained, outside) <= 1e-5

TINY = ["--seq-len", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--precision", "fp32",
        "--log-every", "1"]


@pytest.mark.parametrize("model", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_pretrain_then_sft_packed_and_unpacked(model, tmp_path, capsys):
    """Tiny preset on the built-in sample (no --data: the quick-start path), then SFT from that run."""
    from transformers import AutoModelForCausalLM

    pre = tmp_path / "pre"
    code, err = run_cli(["pretrain", "--model", model, *TINY, "--max-steps", "3", "--eval-every", "3",
                         "--output-dir", str(pre)], capsys)
    assert code == 0, err
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "final/model.safetensors", "final/config.json",
                 "final/tokenizer.json", "final/generation_config.json"):
        assert (pre / name).is_file(), name
    assert list((pre / "logs").rglob("events.out.tfevents.*"))
    # generate() and vLLM on the model (or its export) stop at the end of a chat turn, not only at eos
    generation = json.loads((pre / "final" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 32001] and generation["pad_token_id"] == 0  # <|endoftext|>, <|im_end|>
    records = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and "grad_norm" in r and r["mem_gib"] > 0
               for r in records if "loss" in r)
    assert [r["tokens_seen"] for r in records if "loss" in r] == [step * 4 * 32 for step in (1, 2, 3)]
    elapsed = [r["elapsed_s"] for r in records if "loss" in r]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert any("val/loss" in r for r in records)  # the periodic validation on the shards' val split
    loaded, info = AutoModelForCausalLM.from_pretrained(pre / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if model == "mini_deepseekv3":
        assert loaded.config.num_mtp_layers == 0 and not any(k.startswith("mtp.") for k in loaded.state_dict())
        assert {"loss/mtp", "loss/seq_aux", "moe/layer_0/max_min_ratio", "moe/layer_0/cv", "moe/layer_0/max_over_mean",
                "moe/layer_0/idle_experts"} <= set(records[0])
    for packing in ("--packing", "--no-packing"):
        out = tmp_path / f"sft{packing}"
        code, err = run_cli(["sft", "--model-path", str(pre), packing, "--seq-len", "128", "--micro-batch-size",
                             "2", "--global-batch-size", "2", "--max-steps", "2", "--precision", "fp32",
                             "--log-every", "1", "--output-dir", str(out)], capsys)
        assert code == 0, err
        sft_losses = losses(out)
        assert sorted(sft_losses) == [1, 2] and all(0 < v < 20 for v in sft_losses.values())
        assert (out / "final" / "model.safetensors").is_file()
    # SFT refuses another tokenizer than the model's, and a model whose weights do not load: one line, no run
    other_tokenizer = _other_tokenizer_shards(tmp_path).parent / "tok"
    broken = tmp_path / "broken"
    shutil.copytree(pre / "final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for extra, expected in ((["--model-path", str(pre), "--tokenizer", str(other_tokenizer)], "not the tokenizer"),
                            (["--model-path", str(broken)], "cannot load the model")):
        code, err = run_cli(["sft", *extra, "--max-steps", "1", "--output-dir", str(tmp_path / "refused")], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("packing", ["--packing", "--no-packing"])
def test_sft_val_loss_is_the_models_loss_on_the_held_out_chats(packing, tmp_path, capsys):
    """SFT data built with --val-fraction gives SFT runs a `val/loss`: the mean cross-entropy over the assistant
    tokens of the held-out conversations, here computed by hand with the model the run ends with."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from minillm.data.sft import SFTDataset, build_sft_dataset

    code, err = run_cli(["pretrain", "--model", "mini_llama3", *TINY, "--max-steps", "1", "--model-arg",
                         "num_hidden_layers=2", "--output-dir", str(tmp_path / "pre")], capsys)  # fmt: skip
    assert code == 0, err
    chats = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n", encoding="utf-8")
    data = tmp_path / "sft_data"
    build_sft_dataset([str(tmp_path / "chats.jsonl")], data, tmp_path / "pre" / "final", max_seq_len=128,
                      pack=packing == "--packing", val_fraction=0.25, progress=False)  # fmt: skip
    out = tmp_path / "sft"
    code = cli_helpers.run_cli("sft", "--model-path", str(tmp_path / "pre"), "--data", str(data), packing,
                               "--seq-len", "128", "--micro-batch-size", "2", "--global-batch-size", "2",
                               "--max-steps", "2", "--eval-every", "2", "--precision", "fp32", "--output-dir", str(out))
    printed, err = capsys.readouterr()
    assert code == 0, err
    (logged,) = [r["val/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if "val/loss" in r]  # fmt: skip
    # on the terminal as well (it once went only to metrics.jsonl and TensorBoard)
    assert f"step 2: val loss {logged:.4f}" in printed and f"(val loss {logged:.4f}); model saved to" in printed
    assert f"starting from {tmp_path / 'pre' / 'final'}" in printed  # the run says which model it fine-tunes
    assert "model mini_llama3: " in printed and " parameters; device cpu; 512 tokens, " in printed
    # not a terminal (a log file): no live bar, one line per log interval, as it happens
    assert "step 2/2 | loss " in printed and "━" not in printed
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    total, targets = 0.0, 0
    val = SFTDataset(data, split="val")
    with torch.no_grad():
        for i in range(len(val)):
            row = val[i]
            kwargs = {"position_ids": row["position_ids"][None]} if "position_ids" in row else {}
            logits = model(input_ids=row["input_ids"][None], **kwargs).logits[0, :-1]
            labels = row["labels"][1:].clone()
            if "position_ids" in row:
                labels[row["position_ids"][1:] == 0] = -100  # a conversation's first token is not predicted
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            targets += int((labels != -100).sum())
    assert targets > 0 and logged == pytest.approx(total / targets, rel=1e-5)


def test_sft_in_bf16_on_a_cpu_pads_batches_to_row_buckets(tmp_path, capsys, monkeypatch):
    """On a CPU in bf16 the trainer has the SFT collator round each batch's length up to a `row_bucket` size (at
    most --seq-len), so oneDNN meets recurring shapes; in fp32 batches keep their longest row."""
    from minillm.data.sft import SFTDataset, build_sft_dataset
    from minillm.models.layers.linear import row_bucket
    from minillm.training import trainer

    code, err = run_cli(["pretrain", "--model", "mini_llama3", *TINY, "--max-steps", "1", "--model-arg",
                         "num_hidden_layers=1", "--output-dir", str(tmp_path / "pre")], capsys)  # fmt: skip
    assert code == 0, err
    chats = [{"messages": [{"role": "user", "content": "why? " * (1 + i % 7)},
                           {"role": "assistant", "content": f"because {i}."}]} for i in range(12)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n", encoding="utf-8")
    build_sft_dataset([str(tmp_path / "chats.jsonl")], tmp_path / "data", tmp_path / "pre" / "final",
                      max_seq_len=128, progress=False)  # fmt: skip
    rows = SFTDataset(tmp_path / "data")
    items = [rows[i] for i in range(4)]
    longest = max(len(item["input_ids"]) for item in items)
    assert row_bucket(longest) != longest  # the data must leave room for padding
    seen = []
    real = trainer.bucket_batch_lengths
    monkeypatch.setattr(trainer, "bucket_batch_lengths", lambda collate, *a: seen.append(collate) or real(collate, *a))
    for precision in ("bf16", "fp32"):
        code, err = run_cli(["sft", "--model-path", str(tmp_path / "pre"), "--data", str(tmp_path / "data"),
                             "--seq-len", "128", "--micro-batch-size", "2", "--global-batch-size", "2", "--max-steps",
                             "2", "--precision", precision, "--output-dir", str(tmp_path / precision)], capsys)  # fmt: skip
        assert code == 0, err
    (bf16, fp32) = seen
    assert bf16(items)["input_ids"].shape[1] == min(row_bucket(longest), 128)
    assert fp32(items)["input_ids"].shape[1] == longest


def test_non_finite_loss_skips_the_step_and_several_stop_the_run(tmp_path, shards):
    from minillm.data.pretrain import PretrainDataset
    from minillm.errors import UserError
    from minillm.models.registry import build_model
    from minillm.tokenizer import load_tokenizer
    from minillm.training.batches import Permutation
    from minillm.training.config import TrainConfig
    from minillm.training.setup import stack_collate
    from minillm.training.trainer import Run, train

    def make_run(bad_calls: set[int]) -> Run:
        torch.manual_seed(0)
        model = build_model("mini_llama3", "tiny", num_hidden_layers=2)
        forward, calls = model.forward, [0]

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] in bad_calls:
                out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        data = PretrainDataset(shards, 32)
        return Run(model=model, tokenizer=load_tokenizer(), train_data=data, sampler=Permutation(len(data), 0),
                   collate=stack_collate, model_name="mini_llama3")

    config = TrainConfig(stage="pretrain", model="mini_llama3", seq_len=32, micro_batch_size=2, global_batch_size=4,
                         max_steps=4, save_every=3, precision="fp32", log_every=1, max_bad_steps=3)
    # micro-batch 4 is the second half of step 2: the whole step is skipped
    run_dir = train(config.replace(output_dir=str(tmp_path / "one")), run=make_run({4}))
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert rows[1]["skipped_steps"] == 0 and rows[2]["skipped_steps"] == 1 and "loss" not in rows[2]
    assert rows[4]["skipped_steps"] == 1 and rows[4]["loss"] > 0
    optimizer_state = torch.load(run_dir / "checkpoints" / "step_00000003" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in optimizer_state["state"].values()} == {2}  # 3 steps, one of them skipped

    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
        train(config.replace(output_dir=str(tmp_path / "many")), run=make_run(set(range(3, 100))))


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "cli" / "main.py"), *args]


def test_resume_after_sigkill_repeats_the_same_losses(tmp_path, shards, capsys):
    """Kill a run between checkpoints, resume it, and get bit-identical per-step losses (fp32, one process)."""
    args = ["pretrain", "--model", "mini_deepseekv3", "--data", str(shards), *TINY, "--max-steps", "10000",
            "--save-every", "2", "--keep-last", "2", "--model-arg", "num_hidden_layers=2"]
    reference, resumed, log = tmp_path / "reference", tmp_path / "resumed", tmp_path / "stderr.log"
    kill_after_step(start(_cli(args + ["--output-dir", str(reference)]), log), reference, 6, log)
    kill_after_step(start(_cli(args + ["--output-dir", str(resumed)]), log), resumed, 3, log)
    checkpoints = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert checkpoints[-1] in ("step_00000002", "step_00000004")  # killed after step 3, maybe mid-save of 4
    # Resuming with another schedule (here the length; e.g. a resume without the original flags) is refused, with
    # the command that resumes with the run's own options
    other = [a if a != "10000" else "20" for a in args] + ["--output-dir", str(resumed), "--resume", "latest"]
    code, err = run_cli(other, capsys)
    assert code == 2 and "max_steps: 10000 -> 20" in err and f"--config {resumed / 'config.yaml'}" in err, err
    # A checkpoint split over other processes (here: as if saved by 2 ranks under ZeRO-2) is refused in one line
    # before anything loads; DeepSpeed or accelerate used to fail on it with a traceback on every rank
    state_file = resumed / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["launch"] == {"processes": 1, "zero_stage": None}
    state_file.write_text(json.dumps({**state, "launch": {"processes": 2, "zero_stage": 2}}))
    saved_config = (resumed / "config.yaml").read_text()
    code, err = run_cli(args + ["--output-dir", str(resumed), "--resume", str(state_file.parent), "--keep-last", "1"],
                        capsys)
    assert code == 2 and "saved by 2 processes, DeepSpeed ZeRO-2, but this launch has 1 process" in err, err
    # the refused launch's options were once written into the run's config.yaml (keep_last 1 would then have
    # deleted checkpoints in the resume its error message advises)
    assert (resumed / "config.yaml").read_text() == saved_config
    state_file.write_text(json.dumps(state))
    kill_after_step(start(_cli(args + ["--output-dir", str(resumed), "--resume", "latest"]), log), resumed, 6, log)
    ref, res = losses(reference), losses(resumed)
    common = [s for s in range(1, 7) if s in ref and s in res]
    assert common == list(range(1, 7))
    assert [res[s] for s in common] == [ref[s] for s in common]  # bit-identical, including the expert biases


def test_sigterm_saves_a_checkpoint_at_that_step_and_the_run_continues_from_it(tmp_path, shards):
    """What a scheduler sends before it kills a job (and what Ctrl-C does): the step in flight finishes, a
    checkpoint of it is saved, the process exits 143 with one line saying how to continue; continuing gives the
    losses of a run that never stopped, bit for bit."""
    import re
    import signal

    args = ["pretrain", "--model", "mini_llama3", "--data", str(shards), *TINY, "--max-steps", "10000",
            "--save-every", "1000", "--model-arg", "num_hidden_layers=2"]  # fmt: skip
    reference, stopped, log = tmp_path / "reference", tmp_path / "stopped", tmp_path / "stderr.log"
    kill_after_step(start(_cli(args + ["--output-dir", str(reference)]), log), reference, 7, log)
    proc = start(_cli(args + ["--output-dir", str(stopped)]), log)
    deadline = time.time() + 240
    while 2 not in losses(stopped):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-4000:]
    message = log.read_text().strip().splitlines()[-1]
    found = re.fullmatch(r"stopped at step (\d+) of 10000 \(SIGTERM\); saved (\S+); continue with: (.*)", message)
    assert found, message
    step = int(found[1])
    assert step >= 2 and Path(found[2]) == stopped / "checkpoints" / f"step_{step:08d}" and Path(found[2]).is_dir()
    assert found[3] == f"minillm pretrain --config {stopped / 'config.yaml'} --resume {stopped}"
    resume = ["pretrain", "--config", str(stopped / "config.yaml"), "--resume", str(stopped)]
    kill_after_step(start(_cli(resume), log), stopped, 7, log)
    ref, res = losses(reference), losses(stopped)
    assert [res[s] for s in range(1, 8)] == [ref[s] for s in range(1, 8)]


def test_a_launched_process_keeps_the_default_signal_effect(monkeypatch):
    """Under a launcher the parent stopped by Ctrl-C does not wait: a graceful child would run on, orphaned."""
    from minillm.training.interrupt import LAUNCHER_ENV, started_directly

    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert started_directly()
    for name in ("MINILLM_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.setenv(name, "1")
        assert not started_directly()
        monkeypatch.delenv(name)


def test_a_second_signal_stops_at_once():
    import os
    import signal

    from minillm.training.interrupt import StopRequest

    seen = []
    with StopRequest(True, on_request=seen.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and seen == ["SIGINT"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    with StopRequest(False) as stop, pytest.raises(KeyboardInterrupt):  # several processes: the default effect
        os.kill(os.getpid(), signal.SIGINT)


def test_sft_rows_default_to_the_length_the_data_was_built_for(tmp_path, capsys):
    """`minillm data sft` (default --max-seq-len 512) then `minillm sft --data` (default --seq-len 256) used to
    stop with "rows of up to 512 tokens ... longer than --seq-len 256": without --seq-len, SFT takes the data's."""
    import yaml
    from inference_helpers import build_model, build_tokenizer, save_model_dir

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    model_dir = save_model_dir(build_model("mini_llama3", len(tokenizer)), tokenizer, tmp_path / "model")
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"the cat number {i}"},
                          {"role": "assistant", "content": f"the dog number {i} runs"}]} for i in range(12)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = run_cli(["data", "sft", "--input", str(chats), "--tokenizer", str(model_dir), "--max-seq-len", "48",
                         "--out", str(tmp_path / "sft")], capsys)  # fmt: skip
    assert code == 0, err
    from minillm.training.config import build_config

    # resolved so wherever the config is read (minillm info --config, the --launcher parent, the run itself)
    assert build_config("sft", None, {"data": str(tmp_path / "sft")}).resolve().seq_len == 48
    assert build_config("sft", None, {"data": str(tmp_path / "sft"), "seq_len": 64}).resolve().seq_len == 64
    run = tmp_path / "run"
    code, err = run_cli(["sft", "--model-path", str(model_dir), "--data", str(tmp_path / "sft"), "--max-steps", "1",
                         "--micro-batch-size", "2", "--global-batch-size", "2", "--output-dir", str(run)], capsys)
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["seq_len"] == 48
    # longer than the rows: they stay as built, while the tokens and MFU count the longer length; said (a warning:
    # runs made so must still resume)
    code, err = run_cli(["sft", "--model-path", str(model_dir), "--data", str(tmp_path / "sft"), "--seq-len", "64",
                         "--max-steps", "1", "--micro-batch-size", "2", "--global-batch-size", "2", "--output-dir",
                         str(tmp_path / "longer")], capsys)  # fmt: skip
    assert code == 0 and "warning: seq_len 64 is longer than the rows of --data" in err, err
    assert "(at most 48 tokens" in err and "pass --seq-len 48" in err, err


def test_resume_with_another_micro_batch_size_continues_the_same_steps(tmp_path, shards, capsys):
    """A step is one global batch however it is split: resuming with half the micro-batch (a smaller device)
    gives the losses of the run that went on without stopping (to rounding). Resumed at an odd step: Accelerate's
    restored micro-step count (3 steps x 2 micro-batches) is not a multiple of the new accumulation (4), which once
    left every later step without its optimizer step."""
    import yaml

    args = ["pretrain", "--model", "mini_llama3", "--data", str(shards), *TINY, "--max-steps", "5", "--save-every",
            "3", "--model-arg", "num_hidden_layers=2"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    code, err = run_cli(args + ["--output-dir", str(whole)], capsys)
    assert code == 0, err
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "final")
    step_3 = resumed / "checkpoints" / "step_00000003"
    # a resumed run stays in its directory, and its config records that one (another --output-dir, as the config of
    # a copied run gives here, was recorded: the next `--config RUN/config.yaml --resume RUN` then looked there)
    code, err = run_cli(args + ["--output-dir", str(whole), "--resume", str(step_3), "--micro-batch-size", "1"],
                        capsys)  # fmt: skip
    assert code == 0, err
    assert f"note: --output-dir {whole}: resuming continues the run where it is, in {resumed}" in err, err
    assert yaml.safe_load((resumed / "config.yaml").read_text())["output_dir"] == str(resumed)
    ref, res = losses(whole), losses(resumed)
    assert sorted(res) == [1, 2, 3, 4, 5] and [res[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]
    for s in (4, 5):
        assert abs(res[s] - ref[s]) <= 1e-5 * ref[s], (res, ref)
    assert "micro_batch_size: 1" in (resumed / "config.yaml").read_text()  # the record says how it went on
    # the elapsed time goes on from the checkpoint's, as `minillm info` adds it up (it once started again at 0)
    elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert elapsed[3] < elapsed[4] < elapsed[5], elapsed


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written or overwritten


def _other_tokenizer_shards(tmp: Path) -> Path:
    from minillm.data.pretrain import build_pretrain_shards
    from minillm.tokenizer import train_tokenizer

    corpus = write_text_corpus(tmp / "c.jsonl", n_docs=100)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    train_tokenizer(texts, tmp / "tok", vocab_size=300, show_progress=False)
    out = tmp / "other_shards"
    build_pretrain_shards([str(corpus)], out, tokenizer_dir=tmp / "tok", progress=False)
    return out


def _contradicting_launcher(tmp: Path) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 3
    (tmp / "ds.json").write_text(json.dumps(ds))
    text = (ROOT / "accelerate_configs" / "deepspeed_zero2.yaml").read_text()
    launcher = tmp / "launcher.yaml"
    launcher.write_text(text.replace("ds_configs/zero2.json", str(tmp / "ds.json")))
    return launcher


BAD_INPUTS = {
    "unknown model": (["pretrain", "--model", "mini_gpt5"], "unknown model 'mini_gpt5'"),
    "unknown preset": (["pretrain", "--model", "mini_llama3", "--preset", "huge"], "unknown preset 'huge'"),
    "recipe unknown key": (["pretrain", "--config", "{tmp}/r.yaml"], "unknown key 'sequence_len'"),
    "other tokenizer": (["pretrain", "--model", "mini_llama3", "--data", "{other_shards}"], "fingerprint"),
    "sft from a non-model": (["sft", "--model-path", "{tmp}/not_a_model"], "not a model directory"),
    # a model saved without its tokenizer: the default one is larger than its vocabulary (said to be --tokenizer's)
    "sft from a model without its tokenizer": (["sft", "--model-path", "{small_model}"],
                                                "has no tokenizer, and minillm's default has 32004 tokens, more than "
                                                "the model's 256"),
    "batch not divisible": (["pretrain", "--model", "mini_llama3", "--micro-batch-size", "4", "--global-batch-size",
                             "6"], "not divisible"),
    "batch not divisible by processes": (["pretrain", "--model", "mini_llama3", "--launcher",
                                          "accelerate_configs/cpu_multiprocess.yaml", "--micro-batch-size", "4",
                                          "--global-batch-size", "4"], "2 x 4"),
    "deepspeed contradicts recipe": (["pretrain", "--model", "mini_llama3", "--launcher", "{launcher}",
                                      "--micro-batch-size", "2", "--global-batch-size", "4"],
                                     "train_micro_batch_size_per_gpu=3 contradicts"),
    "nothing to resume": (["pretrain", "--model", "mini_llama3", "--resume", "latest"], "no checkpoint to resume"),
    "output dir holds a run": (["pretrain", "--model", "mini_llama3", "--output-dir", "{tmp}/old_run"],
                               "already holds a run"),
    "output dir holds other files": (["pretrain", "--model", "mini_llama3", "--output-dir", "{tmp}/not_a_model",
                                      "--overwrite"], "holds no run"),
    "output dir under a file": (["pretrain", "--model", "mini_llama3", "--output-dir", "{tmp}/r.yaml/run"],
                                "is a file, not a directory"),
    "adam beta out of range": (["pretrain", "--model", "mini_llama3", "--adam-beta1", "1.5"], "--adam-beta1"),
    "model arg typo": (["pretrain", "--model", "mini_llama3", "--model-arg", "num_hiden_layers=2"],
                       "did you mean 'num_hidden_layers'"),
    "recipe given as launcher": (["pretrain", "--model", "mini_llama3", "--launcher", "{tmp}/r.yaml"],
                                 "not an accelerate config"),
    # --model-arg values of the wrong type or range: once a traceback, some only at the first forward, after the
    # run directory was made (and a NaN run reported as a success for rms_norm_eps=-1)
    "model arg not a number": (["pretrain", "--model", "mini_llama3", "--model-arg", "rms_norm_eps=abc"],
                               "rms_norm_eps takes float, got 'abc'"),
    "model arg out of range": (["pretrain", "--model", "mini_llama3", "--model-arg", "rms_norm_eps=-1"],
                               "rms_norm_eps must be > 0"),
    "model arg not a list": (["pretrain", "--model", "mini_qwen3_next", "--model-arg", "mlp_only_layers=5"],
                             "mlp_only_layers takes list[int] | None, got 5"),
    "model arg legacy key": (["pretrain", "--model", "mini_llama3", "--model-arg", "rope_theta=abc"],
                             "could not convert string to float"),
    "model arg not YAML": (["pretrain", "--model", "mini_llama3", "--model-arg", "x=[1"], "not valid YAML"),
    "model arg before launching": (["pretrain", "--model", "mini_llama3", "--launcher",
                                    "accelerate_configs/cpu_multiprocess.yaml", "--micro-batch-size", "4",
                                    "--global-batch-size", "8", "--model-arg", "num_hidden_layers=-1"],
                                   "num_hidden_layers must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default runs/ directory would appear here
    (tmp_path / "r.yaml").write_text("model: mini_llama3\nsequence_len: 64\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    old_run = tmp_path / "old_run"
    (old_run / "checkpoints" / "step_00000005").mkdir(parents=True)
    (old_run / "config.yaml").write_text("model: mini_llama3\n")
    values = {"tmp": str(tmp_path)}
    if case == "other tokenizer":
        values["other_shards"] = str(_other_tokenizer_shards(tmp_path))
    if case == "deepspeed contradicts recipe":
        values["launcher"] = str(_contradicting_launcher(tmp_path))
    if case == "sft from a model without its tokenizer":
        from minillm.models.registry import build_model

        build_model("mini_llama3", "tiny", vocab_size=256, num_hidden_layers=1).save_pretrained(tmp_path / "small")
        values["small_model"] = str(tmp_path / "small")
        capsys.readouterr()  # transformers' progress bar while saving, not the command's output
    monkeypatch.chdir(ROOT) if "--launcher" in BAD_INPUTS[case][0] else None
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    argv, expected = BAD_INPUTS[case]
    code, err = run_cli([a.format(**values) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no run directory, nothing replaced


# ---------------------------------------------------------------------------------------------------------------
# Prefetching (the GPU data path, run here on the CPU)


def test_prefetcher_yields_the_same_steps_and_reports_the_consumed_position(shards):
    from minillm.data.pretrain import PretrainDataset
    from minillm.training.batches import GlobalBatches, Permutation, Prefetcher
    from minillm.training.setup import stack_collate

    data = PretrainDataset(shards, 32)

    def batches() -> GlobalBatches:  # a small permutation: the 12 steps cross several epochs
        return GlobalBatches(data, Permutation(10, 3), stack_collate, 4, 2, rank=0, world_size=1)

    plain, ahead = batches(), Prefetcher(batches(), depth=3)
    try:
        for _ in range(12):
            want, got = plain.next_step(), ahead.next_step()
            assert len(want) == len(got) == 2
            for a, b in zip(want, got, strict=True):
                assert all(torch.equal(a[k], b[k]) for k in a)
            deadline = time.monotonic() + 5
            while not ahead._ready.full() and time.monotonic() < deadline:
                time.sleep(0.01)  # let the thread build its 3 steps ahead, so the check below means something
            assert ahead._ready.full()
            assert ahead.state_dict() == plain.state_dict()  # the consumed position, not the prefetched one
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()


def test_training_with_prefetch_matches_without(tmp_path, shards, monkeypatch):
    """The trainer's GPU data path (background collation) forced on the CPU: same losses, same data positions in
    the checkpoints, so a resumed run continues where the prefetching one really was."""
    from minillm.training import trainer
    from minillm.training.config import TrainConfig

    config = TrainConfig(stage="pretrain", model="mini_llama3", data=str(shards), seq_len=32, micro_batch_size=2,
                         global_batch_size=4, max_steps=5, save_every=2, keep_last=5, precision="fp32", log_every=1,
                         model_args={"num_hidden_layers": 2})
    plain = trainer.train(config.replace(output_dir=str(tmp_path / "plain")))
    monkeypatch.setattr(trainer, "prefetch_batches", lambda device: True)
    ahead = trainer.train(config.replace(output_dir=str(tmp_path / "ahead")))
    assert losses(ahead) == losses(plain) and len(losses(plain)) == 5
    for step in ("step_00000002", "step_00000004"):
        states = [json.loads((run / "checkpoints" / step / "trainer_state.json").read_text())["data"]
                  for run in (plain, ahead)]
        assert states[0] == states[1]


def test_step_results_are_read_from_the_device_at_log_intervals_only(tmp_path, shards, monkeypatch):
    """Reading a step's loss waits for the device (on a GPU the host then cannot queue the next step): the loop
    reads the results at the log steps only (the final message repeats the last one), and what it logs is the mean
    of the steps since the previous log, summed on the device."""
    from minillm.training import trainer
    from minillm.training.config import TrainConfig

    reads = []
    read = trainer.StepResult.read

    def recording(result):
        reads.append(result)
        return read(result)

    monkeypatch.setattr(trainer.StepResult, "read", recording)
    config = TrainConfig(stage="pretrain", model="mini_llama3", data=str(shards), seq_len=32, micro_batch_size=2,
                         global_batch_size=4, max_steps=7, log_every=3, precision="fp32", output_dir=str(tmp_path),
                         model_args={"num_hidden_layers": 2})
    run_dir = trainer.train(config)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if "loss" in r]
    assert steps == [3, 6, 7]  # the log steps and the last one
    assert len(reads) == 3  # those three
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in logged if "loss" in r)
    per_step = [json.loads(line)["loss"] for line in (_log_every_step(tmp_path, config) / "metrics.jsonl")
                .read_text().splitlines() if "loss" in json.loads(line)]  # fmt: skip
    means = [sum(per_step[0:3]) / 3, sum(per_step[3:6]) / 3, per_step[6]]
    assert [r["loss"] for r in logged if "loss" in r] == pytest.approx(means, rel=1e-6)


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
@pytest.mark.parametrize("skip_on_device", [False, True])
def test_a_trainer_step_reads_nothing_back_but_the_finite_check(name, skip_on_device, monkeypatch):
    """A whole trainer step from host batches (`forward_backward`: the batch moved to the device, forward, backward;
    `optimizer_step`: clipping, AdamW, scheduler, the MoE bias update), one pretraining and one packed, padded SFT
    micro-batch, with the device emulated on the CPU: one read back, the non-finite check's, and none when the step
    is dropped on the device if need be (fused AdamW's `found_inf`), where the loop reads the flag a step later. The
    loss's target rows, the mask's padding and the positions' restarts are found on the host copies of the batch.
    tests/test_gpu.py counts the same on a GPU."""
    from device_reads import EmulatedDevice

    model, step = trainer_step(name, "fp32", seq_len=24, accumulation=2, num_hidden_layers=2)
    ids = torch.randint(1, 256, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    sft = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(2, 24, dtype=torch.long),
           "position_ids": torch.cat([torch.arange(10), torch.arange(14)])[None].repeat(2, 1)}
    sft["attention_mask"][1, 20:] = 0  # padding, no target (as the collators make it)
    labels[1, 20:] = -100
    with EmulatedDevice(monkeypatch, model) as device:
        result = step([{"input_ids": ids, "labels": ids}, sft], skip_on_device=skip_on_device)
    assert not result.skipped and result.targets == 2 * 23 + 2 * (23 - 4 - 1) - 4  # prompts, document starts, padding
    assert device.reads == ([] if skip_on_device else ["read"]), device.reads
    assert (result.check is not None) is skip_on_device


def test_host_values_are_summed_across_ranks_on_the_host(monkeypatch):
    """A step's target count is summed over ranks through a gloo group, never through the GPU backend (NCCL), which
    would take it to the device, behind the previous step's queued work: the group is made once and reused. (One
    gloo rank stands in here, its backend reported as NCCL.)"""
    from types import SimpleNamespace

    import torch.distributed as dist
    from train_helpers import free_port

    from minillm.training import trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        made = []
        new_group = dist.new_group
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or new_group(**kw))
        accelerator = SimpleNamespace(num_processes=2)  # as if launched: the sum is taken
        local = torch.tensor([7.0, 64.0], dtype=torch.float64)
        for _ in range(2):
            total = trainer._host_sum(accelerator, local)
            assert total.tolist() == [7.0, 64.0] and total.device.type == "cpu" and total is not local
        assert made == [{"backend": "gloo"}]
    finally:
        trainer._HOST_GROUP.clear()
        dist.destroy_process_group()


def _log_every_step(tmp_path, config):
    from minillm.training import trainer

    return trainer.train(config.replace(log_every=1, output_dir=str(tmp_path / "every_step")))


def test_evaluation_time_does_not_count_as_training_speed(tmp_path, shards):
    """tokens/s (and MFU) measure training steps: the window of the step after an evaluation used to include it,
    and read a fraction of the real speed."""
    from minillm.training import trainer
    from minillm.training.config import TrainConfig

    def slow_eval(accelerator, model, step):
        time.sleep(1.0)  # far longer than a tiny step
        return {"val/loss": 1.0}

    config = TrainConfig(stage="pretrain", model="mini_llama3", data=str(shards), seq_len=32, micro_batch_size=2,
                         global_batch_size=4, max_steps=6, log_every=1, eval_every=3, precision="fp32",
                         output_dir=str(tmp_path), model_args={"num_hidden_layers": 2})
    run_dir = trainer.train(config, eval_fn=slow_eval)
    speed = {r["step"]: r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "tokens_per_s" in r}
    assert speed[4] > 0.3 * speed[5]  # step 4 follows the evaluation at step 3 (with it: ~1% of the speed)


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, shards):
    """Resume from step 3 of a run that also saved step 6: step 6 belongs to the abandoned trajectory. Rotation
    keeps the highest steps, so with it in place the resumed run's own step 5 was deleted right after it was saved."""
    from minillm.training import trainer
    from minillm.training.checkpoint import list_checkpoints
    from minillm.training.config import TrainConfig

    config = TrainConfig(stage="pretrain", model="mini_llama3", data=str(shards), seq_len=32, micro_batch_size=2,
                         global_batch_size=4, max_steps=8, save_every=3, precision="fp32", output_dir=str(tmp_path),
                         model_args={"num_hidden_layers": 2})
    trainer.train(config)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006"]
    resumed = config.replace(save_every=5, keep_last=1, resume=str(tmp_path / "checkpoints" / "step_00000003"))
    trainer.train(resumed)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]  # its own newest, kept
    (aside,) = tmp_path.glob("checkpoints.abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["final", "step_00000006"]  # moved, not deleted
    assert (tmp_path / "final" / "config.json").is_file()  # the branch's own, written when it finished


def test_a_finished_run_has_nothing_to_resume(tmp_path, capsys):
    """`--resume RUN` or `--resume latest` of a finished run trained its last steps again and replaced its final
    model. Now refused in one line, naming the checkpoint that branches from it; `latest` without a directory
    passes over finished runs."""
    from cli_helpers import run_cli_err

    run_dir = tmp_path / "run"
    args = ["pretrain", "--model", "mini_llama3", "--max-steps", "3", "--save-every", "2", "--model-arg",
            "num_hidden_layers=1"]
    assert run_cli_err([*args, "--output-dir", str(run_dir)], capsys)[0] == 0
    final = (run_dir / "final" / "model.safetensors").read_bytes()
    for extra in (["--resume", str(run_dir)], ["--output-dir", str(run_dir), "--resume", "latest"]):
        code, err = run_cli_err([*args, *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"the run {run_dir} has finished" in err and f"--resume {run_dir / 'checkpoints' / 'step_00000002'}" in err
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final
    assert not list(run_dir.glob("checkpoints.abandoned-*"))


@pytest.mark.parametrize("rows, micro", [(1, 1), (3, 1), (5, 2), (7, 2), (4, 2), (0, 1)])
def test_every_rank_runs_the_same_validation_forwards(rows, micro, monkeypatch):
    """Under ZeRO-3 and expert parallelism a forward is a collective: with 2 ranks and an odd validation split,
    rank 0 used to run one forward more than rank 1 and the run hung. Each rank now runs as many forwards as the
    largest share needs, and across the ranks every row's targets are counted once (stand-in rows not at all)."""
    import math

    forwards, scored, counted = _validation_pass(monkeypatch, rows, world=2, micro=micro, max_rows=100)
    assert forwards[0] == forwards[1] == math.ceil(math.ceil(rows / 2) / micro)  # rank 0's share, in batches
    assert sum(total[1].item() for total in counted) == 3 * rows  # 3 targets per row of 4 tokens
    assert sorted(scored) == list(range(rows))


@pytest.mark.parametrize("world, micro", [(1, 4), (1, 1), (2, 2), (2, 1), (4, 1)])
def test_validation_scores_the_same_rows_however_the_batch_is_split(world, micro, monkeypatch):
    """`--eval-batches 2 --global-batch-size 4` scores 8 rows spread over the split in one process or several, with
    or without accumulation; it once scored eval_batches micro-batches per rank, so the sample grew with the
    number of processes and shrank with the micro-batch (a resume with another --micro-batch-size). Spread, not
    the first 8: a split stored by source or longest first would be scored on one end of it."""
    _, scored, _ = _validation_pass(monkeypatch, rows=20, world=world, micro=micro, max_rows=2 * 4)
    assert sorted(scored) == [0, 2, 5, 7, 10, 12, 15, 17]


def _validation_pass(monkeypatch, rows: int, world: int, micro: int, max_rows: int):
    """Run `validation_loss` as each of `world` ranks would, on rows whose tokens are their index.

    Returns each rank's number of forwards, the indices of the rows scored (stand-in rows left out) and each
    rank's (sum CE, targets) as it enters the all-reduce."""
    import contextlib
    from types import SimpleNamespace

    import minillm.training.trainer as trainer

    dataset = [{"input_ids": torch.full((4,), i), "labels": torch.full((4,), i)} for i in range(rows)]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "labels")}

    forwards, batches, counted = [], [], []

    class Model(torch.nn.Module):
        def forward(self, input_ids, labels, **kwargs):
            forwards[-1] += 1
            batches[-1].append(input_ids[:, 0].tolist())
            return SimpleNamespace(loss=torch.tensor(0.0), aux_losses={})

    monkeypatch.setattr(trainer, "_reduce_sum", lambda accelerator, total: counted.append(total) or total)
    for rank in range(world):
        forwards.append(0)
        batches.append([])
        accelerator = SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu"),
                                      autocast=contextlib.nullcontext)  # fmt: skip
        trainer.validation_loss(accelerator, Model(), dataset, collate, micro, max_rows=max_rows)
        # a rank whose share ran out scores nothing from its stand-in forward (the count says how many it had)
        share = len(range(rank, min(max_rows, rows), world))
        batches[-1] = [row for batch in batches[-1] for row in batch][:share]
    return forwards, [row for rank_rows in batches for row in rank_rows], counted


def test_auto_precision_is_bf16_where_the_hardware_multiplies_in_bf16(monkeypatch):
    """`--precision auto`: bf16 autocast on a CPU with bf16 matrix instructions (AVX512-BF16, AMX), except under
    DeepSpeed; fp32 on other CPUs. An explicit precision is kept whatever the CPU."""
    from minillm.training import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(trainer, "cpu_multiplies_bf16", lambda: True)
    assert trainer.resolve_precision("auto") == "bf16"
    assert trainer.resolve_precision("auto", deepspeed=True) == "no"
    assert trainer.resolve_precision("fp32") == "no"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    assert trainer.resolve_precision("auto") == "no"
    assert trainer.resolve_precision("auto", deepspeed=False) == "bf16"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(trainer, "mps_available", lambda: True)  # Accelerate would train on Apple's GPU
    assert trainer.resolve_precision("auto") == "no"
    monkeypatch.setattr(trainer, "mps_available", lambda: False)
    monkeypatch.setattr(trainer, "cpu_multiplies_bf16", lambda: False)
    assert trainer.resolve_precision("auto") == "no"
    assert trainer.resolve_precision("bf16") == "bf16"


def test_cpu_multiplies_bf16_asks_torchs_probes(monkeypatch):
    from minillm.devices import cpu_multiplies_bf16

    for amx, avx512_bf16, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert cpu_multiplies_bf16() is expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probes: no
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_multiplies_bf16() is False


def test_the_run_names_the_precision_auto_chose(tmp_path, capsys, monkeypatch):
    """The run's first line says which precision `auto` became, and the run trains in it."""
    from cli_helpers import run_cli as run_cli_code

    from minillm.training import trainer

    seen = []
    real = trainer.make_accelerator
    monkeypatch.setattr(trainer, "make_accelerator", lambda config: seen.append(real(config)) or seen[-1])
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer, "cpu_multiplies_bf16", lambda v=native: v)
        code = run_cli_code("pretrain", "--model", "mini_llama3", "--seq-len", "32", "--micro-batch-size", "2",
                            "--global-batch-size", "2", "--max-steps", "1", "--model-arg", "num_hidden_layers=1",
                            "--output-dir", str(tmp_path / expected))  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        header = next(line for line in out.splitlines() if line.startswith("run directory:"))
        assert header.endswith(f", {expected})"), header
        assert str(seen[-1].mixed_precision) == {"bf16": "bf16", "fp32": "no"}[expected]


def test_expert_load_stats_and_the_curves_they_are_plotted_in(tmp_path):
    """max/min once was the only balance figure plotted: with one idle expert it is the busiest expert's count (a
    batch size, 2,048 in a tiny run); max over mean is bounded (E/k) and idle experts are counted."""
    import math

    from minillm.training.metrics import expert_load_stats
    from minillm.training.plots import plot_curves

    stats = expert_load_stats(torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4]]))
    assert stats["moe/layer_0/max_over_mean"] == 1.0 and stats["moe/layer_0/idle_experts"] == 0
    assert stats["moe/layer_1/max_over_mean"] == 2.0 and stats["moe/layer_1/idle_experts"] == 1
    assert stats["moe/layer_1/max_min_ratio"] == 8.0  # min clamped to 1
    records = [{"step": s, "loss": 10 * math.exp(-s / 30), "lr": 1e-3, "grad_norm": 200.0 if s == 5 else 1.0,
                "loss/seq_aux": 1.0, **stats} for s in range(1, 41)] + [{"step": 40, "val/loss": 3.0}]  # fmt: skip
    assert plot_curves(records, tmp_path / "c.png", "pretrain").stat().st_size > 10_000
    assert plot_curves([{"step": 1, "lr": 1e-3}], tmp_path / "none.png") is None  # no loss logged: no plot


def test_tensorboard_groups_the_training_scalars():
    from minillm.training.metrics import tensorboard_tag

    assert [tensorboard_tag(k) for k in ("loss", "loss/mtp", "lr", "grad_norm", "tokens_per_s", "val/loss",
                                         "moe/layer_0/cv")] == [
        "train/loss", "train/loss_mtp", "optim/lr", "optim/grad_norm", "perf/tokens_per_s", "val/loss",
        "moe/layer_0/cv"]
