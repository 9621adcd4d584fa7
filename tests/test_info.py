"""`minillm info` and the parameter / FLOPs counts behind it."""

import os

import pytest
from cli_helpers import run_cli

from minillm.models.registry import build_model
from minillm.models.stats import config_stats, model_stats


def test_llama_base_counts_by_hand():
    s = config_stats("mini_llama3", "base", seq_len=1024)
    d, f, v, layers, heads, kv, hd = 768, 2048, 32004, 12, 12, 4, 64
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d  # q,o + k,v + MLP + 2 norms
    non_embedding = layers * per_layer + d  # + final norm
    assert s.embedding == 2 * v * d  # untied head
    assert s.non_embedding == non_embedding and s.activated_non_embedding == non_embedding
    assert s.total == s.activated == non_embedding + 2 * v * d
    assert 100e6 <= s.total <= 200e6
    assert s.mtp == 0
    assert s.flops_per_token == 6 * non_embedding + 6 * v * d + 6 * layers * heads * (2 * hd) * 1024


def test_tiny_is_under_5m_and_meta_counts_equal_real():
    real = model_stats(build_model("mini_llama3", "tiny"))
    assert real == config_stats("mini_llama3", "tiny")
    assert real.total < 5e6


def test_info_prints_table(capsys):
    assert run_cli("info", "--model", "mini_llama3", "--preset", "base", "--seq-len", "1024") == 0
    out = capsys.readouterr().out
    s = config_stats("mini_llama3", "base", seq_len=1024)
    assert f"{s.total:,}" in out and f"{s.flops_per_token:,}" in out and "seq 1024" in out


def test_info_counts_a_trained_model_directory(tmp_path, capsys):
    """`--model PATH` counts the model a directory holds, with its own sizes (here a preset widened by overrides)."""
    model = build_model("mini_deepseekv3", "tiny", hidden_size=96, num_hidden_layers=3)
    model.save_pretrained(tmp_path / "model")
    expected = model_stats(model)
    assert run_cli("info", "--model", str(tmp_path / "model")) == 0
    out = capsys.readouterr().out
    assert f"{expected.total:,}" in out and f"{expected.flops_per_token:,}" in out
    assert f"{config_stats('mini_deepseekv3', 'tiny').total:,}" not in out
    assert run_cli("info", "--model", str(tmp_path / "model"), "--preset", "base") == 2
    assert "drop --preset" in capsys.readouterr().err
    # a run's model: given as an argument too, its FLOPs at the length the run trained at (the figure its MFU used)
    (tmp_path / "run").mkdir()
    model.save_pretrained(tmp_path / "run" / "final")
    (tmp_path / "run" / "config.yaml").write_text("stage: pretrain\nseq_len: 64\n")
    assert run_cli("info", str(tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert f"{model_stats(model, seq_len=64).flops_per_token:,}" in out
    assert "MTP parameters (training only)" in out  # this directory holds the MTP module's weights
    # as a run saves it, without the module: the row says so rather than a bare 0 that reads "trained without MTP"
    from minillm.training.trainer import export_config

    export_config(model).save_pretrained(tmp_path / "saved")
    assert run_cli("info", "--model", str(tmp_path / "saved")) == 0
    assert "MTP parameters (not in saved models)" in capsys.readouterr().out
    assert run_cli("info", str(tmp_path / "run"), "--model", "mini_llama3") == 2


def test_info_unknown_names(capsys):
    assert run_cli("info", "--model", "gpt5") == 2
    err = capsys.readouterr().err
    assert "mini_llama3, mini_deepseekv3, mini_qwen3_next" in err
    assert run_cli("info", "runs_typo") == 2  # a mistyped run directory: not only "unknown model"
    err = capsys.readouterr().err.strip()
    assert err == "error: runs_typo: no such architecture (mini_llama3, mini_deepseekv3, mini_qwen3_next) and no such " \
        "directory", err
    assert run_cli("info", "--model", "mini_llama3", "--preset", "huge") == 2
    assert "known presets: tiny, small, base" in capsys.readouterr().err
    assert run_cli("info", "--model", "mini_llama3", "--seq-len", "100000") == 2  # beyond the 1,024 positions
    assert "[1, 1024]" in capsys.readouterr().err
    assert run_cli("info", "--config", "recipes/pretrain_llama3_base.yaml", "--model", "mini_qwen3_next") == 2
    assert "recipe decides" in capsys.readouterr().err  # not silently ignored


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_preset_sizes_of_every_model(name):
    tiny, small, base = config_stats(name, "tiny"), config_stats(name, "small"), config_stats(name, "base")
    assert tiny.total < 5e6
    assert 10e6 <= small.total <= 25e6
    assert 100e6 <= base.total <= 200e6
    for s in (tiny, small, base):
        assert s.total == s.embedding + s.non_embedding + s.mtp
        assert s.activated_non_embedding <= s.non_embedding
        if name == "mini_llama3":
            assert s.activated == s.total and s.mtp == 0
        else:  # MoE: only top-k routed experts run per token
            assert s.activated_non_embedding < s.non_embedding
        assert (s.mtp > 0) == (name == "mini_deepseekv3")


def test_moe_activated_counts_only_top_k_routed_experts():
    """With every expert chosen per token, activated equals the inference total; with fewer, the difference is
    exactly the unchosen share of the routed experts' weights."""
    from minillm.models.layers.moe import RoutedExperts

    model = build_model("mini_qwen3_next", "tiny")
    s = model_stats(model)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    routed = sum(p.numel() for m in experts for p in m.parameters())
    k, e = model.config.num_experts_per_tok, experts[0].num_experts
    assert s.non_embedding - s.activated_non_embedding == routed - routed * k // e


# ---------------------------------------------------------------------------------------------------------------
# `minillm info --config RECIPE`: the budget of a run before it starts


def _recipe(tmp_path, **values):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def test_budget_counts_the_built_shards_like_the_trainer(tmp_path, capsys):
    from minillm.data.pretrain import PretrainDataset
    from minillm.training.budget import total_steps
    from minillm.training.config import build_config

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"Document {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(400)),
                    encoding="utf-8")
    shards = tmp_path / "shards"
    assert run_cli("data", "pretrain", "--input", str(text), "--out", str(shards)) == 0
    recipe = _recipe(tmp_path, stage="pretrain", model="mini_llama3", preset="tiny", data=str(shards), seq_len=32,
                     micro_batch_size=4, global_batch_size=8, epochs=2.5, precision="bf16")
    capsys.readouterr()
    assert run_cli("info", "--config", recipe, "--gpu", "A100", "--mfu", "0.5") == 0
    out = capsys.readouterr().out
    rows = len(PretrainDataset(shards, 32, split="train"))
    steps = int(2.5 * (rows // 8))
    assert steps == total_steps(build_config("pretrain", recipe).resolve(), rows) and steps > 10
    assert f"{rows:,} rows" in out and f"{steps:,} (2.5 epochs)" in out
    assert f"{steps * 8 * 32:,}" in out  # token budget = steps x global batch x seq_len
    assert "312 TFLOP/s bf16" in out and "50.0% (given)" in out


def test_budget_wall_time_is_flops_over_peak_times_mfu(tmp_path):
    from minillm.models.stats import config_stats
    from minillm.training.budget import plan
    from minillm.training.config import build_config

    config = build_config("pretrain", _recipe(tmp_path, model="mini_deepseekv3", preset="base", seq_len=512,
                                              micro_batch_size=32, global_batch_size=32, max_steps=1000)).resolve()
    flops = config_stats("mini_deepseekv3", "base", seq_len=512).flops_per_token
    run = plan(config, flops)  # max_steps: no data needed
    assert run.steps == 1000 and run.tokens == 1000 * 32 * 512
    assert run.seconds(989e12, 0.25, devices=2) == pytest.approx(1000 * 32 * 512 * flops / (989e12 * 0.25 * 2))


def test_budget_assumes_the_measured_mfu_of_the_architecture(tmp_path, capsys, monkeypatch):
    """Without --mfu the wall time uses what the trainer measured for a base-preset model of the recipe's
    architecture, compiled or eager as the recipe trains (and says so); other sizes and architectures get the
    benchmark's goal, said to be unmeasured; --mfu wins."""
    from minillm.training import budget

    monkeypatch.setenv("COLUMNS", "400")
    measured = budget.MEASURED_MFU
    unmeasured = "the benchmark's goal; not measured for this model"
    assert budget.default_mfu("mini_deepseekv3", True, base_preset=True, compiled=True) == (
        measured["mini_deepseekv3"]["eager"], "measured on an H200, base preset, eager")  # compiled: not measured
    assert budget.default_mfu("mini_deepseekv3", True, base_preset=False, compiled=False) == (0.25, unmeasured)
    assert budget.default_mfu("some_new_moe", True, base_preset=True, compiled=False) == (0.25, unmeasured)
    assert budget.default_mfu(None, False, base_preset=False, compiled=False)[0] == 0.40
    for preset, compiled, extra, mfu, source in (
        ("base", True, [], measured["mini_llama3"]["compiled"], "measured on an H200, base preset, compiled"),
        ("base", False, [], measured["mini_llama3"]["eager"], "measured on an H200, base preset, eager"),
        ("tiny", True, [], 0.40, unmeasured),
        ("base", True, ["--mfu", "0.5"], 0.5, "given"),
    ):
        recipe = _recipe(tmp_path, model="mini_llama3", preset=preset, seq_len=512, micro_batch_size=32,
                         global_batch_size=32, max_steps=1000, compile=compiled)
        capsys.readouterr()
        assert run_cli("info", "--config", recipe, "--gpu", "H100", *extra) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"{mfu:.1%} ({source})" in out
        seconds = 1000 * 32 * 512 * config_stats_flops("mini_llama3", preset) / (989e12 * mfu)
        assert budget.format_duration(seconds) in out


def config_stats_flops(model: str, preset: str) -> int:
    from minillm.models.stats import config_stats

    return config_stats(model, preset, seq_len=512).flops_per_token


def test_budget_of_an_sft_recipe_before_pretraining_has_no_mtp(tmp_path, capsys, monkeypatch):
    """SFT starts from a pretraining run's final/, saved without DeepSeek-V3's training-only MTP block: a budget
    made before that run exists (the base preset stands in) counts the model SFT will train (677M, not 892M
    FLOPs per token at 512)."""
    from minillm.models.stats import config_stats

    monkeypatch.setenv("COLUMNS", "400")
    recipe = _recipe(tmp_path, stage="sft", model="mini_deepseekv3", seq_len=512, micro_batch_size=16,
                     global_batch_size=16, model_path=str(tmp_path / "not_pretrained_yet"))
    capsys.readouterr()
    assert run_cli("info", "--config", recipe, "--tokens", "1e7") == 0
    out = capsys.readouterr().out
    sft = config_stats("mini_deepseekv3", "base", seq_len=512, num_mtp_layers=0).flops_per_token
    assert sft < config_stats("mini_deepseekv3", "base", seq_len=512).flops_per_token
    assert f"({sft / 1e6:,.0f}M / token)" in out and "not pretrained yet" in out


def test_budget_bad_input_is_one_line(tmp_path, capsys):
    recipe = _recipe(tmp_path, model="mini_llama3", preset="base", data=str(tmp_path / "not_built"))
    capsys.readouterr()
    assert run_cli("info", "--config", recipe) == 2
    assert "does not exist yet" in capsys.readouterr().err
    assert run_cli("info", "--config", recipe, "--tokens", "1e9", "--gpu", "Voodoo5") == 2
    assert "Voodoo5" in capsys.readouterr().err
    assert run_cli("info", "--config", recipe, "--tokens", "1e9", "--mfu", "1.5") == 2
    assert run_cli("info", "--config", recipe, "--tokens", "1e9", "--gpus", "0") == 2
    assert run_cli("info", "--config", recipe, "--tokens", "1000") == 2  # not one global batch: no run
    assert "fewer than one global batch" in capsys.readouterr().err
    for tokens in ("nan", "inf", "1e300", "0.5"):  # once a traceback from int() or the duration formatting
        assert run_cli("info", "--config", recipe, "--tokens", tokens) == 2
        assert "must be a number of tokens from 1 to 1e+15" in capsys.readouterr().err
    assert run_cli("info", "--config", recipe, "--tokens", "1e9") == 0
    capsys.readouterr()
    assert run_cli("info", "--tokens", "1e9", "--gpus", "2") == 2  # silently ignored before
    assert "--tokens, --gpus: only used with --config RECIPE" in capsys.readouterr().err
    bad_args = tmp_path / "bad_args.yaml"  # a model_args value the config refuses: once a traceback here
    bad_args.write_text("model: mini_llama3\nmodel_args:\n  num_hidden_layers: -1\nmax_steps: 10\n")
    assert run_cli("info", "--config", str(bad_args), "--tokens", "1e9") == 2
    assert "num_hidden_layers must be a positive integer" in capsys.readouterr().err


def test_small_presets_compare_like_for_like():
    """The `small` presets are compared on the same data (README "Measured results"): the same width, depth and
    vocabulary, and about the same compute per token outside the embedding (within 1.5x of each other)."""
    from minillm.models.registry import MODEL_NAMES, build_config

    configs = [build_config(name, "small") for name in MODEL_NAMES]
    assert {(c.hidden_size, c.num_hidden_layers, c.vocab_size, c.tie_word_embeddings) for c in configs} == {
        (256, 6, 32004, True)
    }
    activated = [config_stats(name, "small").activated_non_embedding for name in MODEL_NAMES]
    assert max(activated) <= 1.5 * min(activated), activated


def test_info_of_a_run_says_where_it_stands(tmp_path, capsys, monkeypatch):
    """`minillm info RUN_DIR`: finished, stopped (with the command that resumes it and the step it resumes at),
    or training now, with the steps, losses and speed read from its files; an unfinished run is not an error."""
    import json
    import shutil

    from cli_helpers import run_cli_err

    from minillm.runs import RUN_LOCK, lock_run_dir

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    run = tmp_path / "run"
    code, err = run_cli_err(["pretrain", "--model", "mini_llama3", "--model-arg", "num_hidden_layers=1",
                             "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--log-every", "1",
                             "--output-dir", str(run)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["val/loss"], r["step"]) for r in records if "val/loss" in r]
    best, best_step = min(val)
    val_at = {step: loss for loss, step in val}
    code, out = run_cli("info", str(run)), capsys.readouterr().out
    assert code == 0
    text = " ".join(out.split())
    assert "pretrain of mini_llama3 (tiny preset)" in text and f"finished: its model is {run / 'final'}" in text
    assert "4 of 4 logged" in text and f"best {best:.4f} at step {best_step}" in text
    assert f"{[r for r in records if 'loss' in r][-1]['loss']:.4f} at step 4" in text
    assert "total parameters" in text  # and the sizes of its final model

    stopped = tmp_path / "stopped"  # killed after logging step 3: no final/, the checkpoint of step 2 resumes
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "final")
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 3)
                                           + '{"step": 4, "lo')  # a line cut short by the kill
    code, out = run_cli("info", str(stopped)), capsys.readouterr().out
    assert code == 0
    text = " ".join(out.split())
    assert f"continue with: minillm pretrain --config {stopped / 'config.yaml'} --resume {stopped}" in text
    assert "3 of 4 logged" in text and "step 2 (its newest checkpoint; step 3 runs again)" in text
    assert "step_00000002" in text and "total parameters" in text  # its newest checkpoint's sizes
    metrics = (stopped / "metrics.jsonl").read_text()
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 2))
    text = " ".join((run_cli("info", str(stopped)), capsys.readouterr().out)[1].split())
    assert "2 of 4 logged" in text and "│ resumes at │ step 2 (its newest checkpoint) │" in text  # stopped right after it
    (stopped / "metrics.jsonl").write_text(metrics)

    code, out = run_cli("info", str(tmp_path)), capsys.readouterr().out  # the directory of runs: one row each
    assert code == 0
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    train_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert rows == [["run", "finished", "4/4", f"{train_loss[4]:.4f}", f"{best:.4f} (step {best_step})"],
                    ["stopped", "stopped", "3/4", f"{train_loss[3]:.4f}", f"{val_at[2]:.4f} (step 2)"]]
    assert run_cli("info", str(tmp_path), "--seq-len", "64") == 2  # sizes are per run: not silently a model error
    assert "holds runs, listed without their sizes" in capsys.readouterr().err

    # a run saved by several processes resumes under the same launch: the command says so
    state_file = stopped / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "launch": {"processes": 2, "zero_stage": 2}}))
    code, out = run_cli("info", str(stopped)), capsys.readouterr().out
    assert code == 0 and ("--launcher ACCELERATE_CONFIG (the launch it was saved by: 2 processes, DeepSpeed ZeRO-2"
                          in " ".join(out.split())), out
    state_file.write_text(json.dumps(state))

    lock = lock_run_dir(stopped)  # a training process holds it: says so, and writes nothing into the lock
    before = (stopped / RUN_LOCK).read_bytes()
    code, out = run_cli("info", str(stopped)), capsys.readouterr().out
    assert code == 0 and f"training now (pid {os.getpid()})" in " ".join(out.split())
    assert (stopped / RUN_LOCK).read_bytes() == before
    lock.close()

    shutil.rmtree(stopped / "checkpoints")
    code, out = run_cli("info", str(stopped)), capsys.readouterr().out
    assert code == 0 and "nothing to resume" in " ".join(out.split()) and "total parameters" not in out


def test_a_trainer_waits_out_a_reader_of_the_run_lock(tmp_path):
    """`minillm info` takes a shared lock on a run for a moment; a trainer starting then was refused as if another
    trainer held the run."""
    import fcntl
    import threading

    from minillm.runs import RUN_LOCK, lock_run_dir

    (tmp_path / RUN_LOCK).write_text("")
    reader = open(tmp_path / RUN_LOCK)  # noqa: SIM115
    fcntl.flock(reader, fcntl.LOCK_SH)
    threading.Timer(0.3, reader.close).start()
    lock = lock_run_dir(tmp_path)
    assert (tmp_path / RUN_LOCK).read_text() == f"{os.getpid()}\n"
    lock.close()


def test_a_reader_holding_the_lock_too_long_is_named_as_a_reader(tmp_path):
    """A shared lock held past the trainer's 2 s of waiting is a reader (`minillm info`), not a trainer: the one-line
    refusal says so (it said another training process was writing the run)."""
    import fcntl

    from minillm.errors import UserError
    from minillm.runs import RUN_LOCK, lock_run_dir

    (tmp_path / RUN_LOCK).write_text("")
    with open(tmp_path / RUN_LOCK) as reader:
        fcntl.flock(reader, fcntl.LOCK_SH)
        with pytest.raises(UserError, match="held this run's lock for reading") as err:
            lock_run_dir(tmp_path)
    assert "training process" not in str(err.value)
    assert (tmp_path / RUN_LOCK).read_text() == ""  # nothing written


def test_training_time_adds_up_the_starts_of_a_resumed_run(tmp_path):
    from minillm.runs import RunProgress

    records = [{"step": 1, "elapsed_s": 10.0}, {"step": 2, "elapsed_s": 20.0},  # resumed from step 2 ...
               {"step": 3, "elapsed_s": 7.0}, {"step": 4, "elapsed_s": 12.0}]  # ... by a minillm that began at 0
    assert RunProgress(tmp_path, {}, "finished", records).training_seconds == 32.0
    records[2:] = [{"step": 3, "elapsed_s": 27.0}, {"step": 4, "elapsed_s": 32.0}]  # now: from the checkpoint's
    assert RunProgress(tmp_path, {}, "finished", records).training_seconds == 32.0
