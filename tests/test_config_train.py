"""Trainer configuration: recipes, CLI overrides, unknown keys, the LR schedule and the no-decay groups (no training)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from minillm.errors import UserError
from minillm.training.config import TrainConfig, build_config, load_recipe, shipped_recipes
from minillm.training.optim import grad_norm, lr_at, param_groups


def test_unknown_recipe_key_names_it_and_suggests_the_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: mini_llama3\nlearning_rate: 1e-3\nmicro_batch: 4\n")
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert "'learning_rate'" in message and str(recipe) in message
    assert "did you mean 'lr'" in message  # another trainer's name for it; by spelling it was 'decay_ratio'
    for key, hint in (("min_lr_", "min_lr"), ("num_train_epochs", "epochs"), ("Learning-Rate", "lr"),
                      ("grad_checkpointing", "gradient_checkpointing"), ("max_seq_length", "seq_len")):  # fmt: skip
        recipe.write_text(f"model: mini_llama3\n{key}: 1\n")
        with pytest.raises(UserError, match=f"unknown key '{key}' \\(did you mean '{hint}'\\?\\)"):
            load_recipe(recipe)
    recipe.write_text("model: mini_llama3\nbanana: 1\n")
    with pytest.raises(UserError, match="unknown key 'banana'$"):  # nothing close: no guess
        load_recipe(recipe)


def test_a_recipe_that_is_not_yaml_says_where(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: mini_llama3\nlr: [0.1, 0.2\nepochs: 2\n")
    with pytest.raises(UserError, match=r"not valid YAML: expected ',' or ']', but got ':' \(line 3, column 7\)$"):
        load_recipe(recipe)


def test_a_recipe_or_launcher_that_is_not_utf8_is_one_line(tmp_path):
    from minillm.training.launch import read_launcher

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe model: x\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_recipe(bad)
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_launcher(bad)
    with pytest.raises(UserError, match="a directory; give an accelerate config file"):
        read_launcher(tmp_path)


def test_launcher_paths(tmp_path, monkeypatch):
    """The shipped configs are found from any directory by their README name or alone; a path elsewhere that does
    not exist is refused (it once ran the shipped file of the same name, unsaid)."""
    from minillm.training.launch import read_launcher

    monkeypatch.chdir(tmp_path)
    for name in ("accelerate_configs/ddp.yaml", "ddp.yaml"):
        assert read_launcher(name)[1].parent.name == "accelerate_configs"
    with pytest.raises(UserError, match="^--launcher my_configs/ddp.yaml: no such accelerate config file$"):
        read_launcher("my_configs/ddp.yaml")


def test_torchruns_report_of_a_failed_rank_is_held_back(monkeypatch):
    """Under `--launcher` the ranks' stderr passes through as it comes; from torch's elastic agent's first log
    line on, the rest is returned instead (dropped when a rank left its one-line error, printed for a crash)."""
    import io
    import sys

    from minillm.training.launch import _pass_stderr_until_failure_report

    report = (b"W1129 23:11:43.992000 15278 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] "
              b"Sending process 15283 closing signal SIGTERM\nTraceback (most recent call last):\n  ChildFailedError\n")
    stream = io.BytesIO(b"warning: eval_every 5, but no validation data\n" + report)
    stderr = io.TextIOWrapper(io.BytesIO(), write_through=True)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert _pass_stderr_until_failure_report(stream) == report
    assert stderr.buffer.getvalue() == b"warning: eval_every 5, but no validation data\n"


def test_a_bad_flag_value_names_the_flag():
    from minillm.training.config import build_config

    with pytest.raises(UserError, match="^--lr nan: invalid \\(expected a finite number\\)$"):
        build_config("pretrain", None, {"lr": "nan"})
    with pytest.raises(UserError, match="^--warmup-steps 2.5: invalid \\(expected an integer\\)$"):
        build_config("pretrain", None, {"warmup_steps": "2.5"})


def test_a_mistyped_recipe_folder_is_not_replaced_by_a_shipped_namesake(tmp_path, monkeypatch):
    """A shipped recipe is found by name or as recipes/NAME from any directory; `myexp/quickstart_pretrain.yaml`
    that does not exist used to train the shipped quickstart_pretrain.yaml without a word."""
    monkeypatch.chdir(tmp_path)
    assert load_recipe("quickstart_pretrain.yaml") == load_recipe("recipes/quickstart_pretrain.yaml")
    assert load_recipe("quickstart_pretrain")["stage"] == "pretrain"
    with pytest.raises(UserError, match="recipe myexp/quickstart_pretrain.yaml does not exist"):
        load_recipe("myexp/quickstart_pretrain.yaml")
    (tmp_path / "myexp").mkdir()
    with pytest.raises(UserError, match="recipe myexp is a directory"):
        load_recipe("myexp")


def test_recipe_values_are_typed_and_cli_flags_override_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    # YAML 1.1 reads 1e-3 as a string: the loader converts it to the field's type
    recipe.write_text("model: mini_llama3\nlr: 1e-3\nseq_len: 64\nmodel_args: {num_hidden_layers: 2}\n")
    config = build_config("pretrain", str(recipe), {"seq_len": 32, "model_args": {"hidden_size": 32}})
    assert config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.seq_len == 32  # the flag wins
    assert config.model_args == {"num_hidden_layers": 2, "hidden_size": 32}
    with pytest.raises(UserError, match="--seq-len many: invalid"):
        build_config("pretrain", None, {"seq_len": "many"})
    with pytest.raises(UserError, match="did you mean 'max_steps'"):
        build_config("pretrain", None, {"max_step": 3})


@pytest.mark.parametrize("text, name", [
    ("lr: .inf", "lr"), ("epochs: .nan", "epochs"), ("max_steps: 1e9999", "max_steps"), ("seed: 1e400", "seed"),
])
def test_a_number_that_is_not_finite_is_one_line(tmp_path, text, name):
    """`--lr inf` used to train a model of NaNs to exit 0; `epochs: .nan` and `max_steps: 1e9999` were tracebacks."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: mini_llama3\n{text}\n")
    with pytest.raises(UserError, match=f"{name}=.*expected a finite number"):
        build_config("pretrain", str(recipe))
    with pytest.raises(UserError, match="expected a finite number"):
        build_config("pretrain", None, {name: float("inf")})  # a CLI flag, as typer parses it
    with pytest.raises(UserError, match=r"^--max-steps 10+\.\.\.: invalid"):
        build_config("pretrain", None, {"max_steps": 10**400})


def test_a_recipe_key_the_stage_does_not_use_is_refused(tmp_path):
    """`packing: true` in a pretraining recipe was silently ignored; a key holding its default passes, since a
    run's saved config.yaml (a valid recipe) records every field."""
    recipe = tmp_path / "r.yaml"
    for text, stage, message in [
        ("model: mini_llama3\npacking: true\n", "pretrain", "packing is a sft option; pretrain runs do not use it"),
        ("model: mini_llama3\nmodel_path: runs/x/final\n", "pretrain", "model_path is a sft option"),
        ("preset: base\n", "sft", "preset is a pretrain option; sft runs do not use it"),
        ("model_args: {num_hidden_layers: 2}\n", "sft", "model_args is a pretrain option"),
    ]:
        recipe.write_text(text)
        with pytest.raises(UserError, match=message):
            build_config(stage, str(recipe))
    recipe.write_text("model: mini_llama3\npreset: tiny\nmodel_args: {}\npacking: false\nmodel_path: null\n")
    assert build_config("sft", str(recipe)).model == "mini_llama3"
    assert build_config("pretrain", str(recipe)).packing is False


def test_an_sft_recipe_model_that_is_not_the_model_path_is_refused(tmp_path, capsys):
    """An SFT recipe's `model` picks the latest pretraining run of that architecture; beside a model path of
    another architecture it used to be silently replaced by the path's."""
    from inference_helpers import build_model, build_tokenizer, save_model_dir

    from cli.main import main

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    model_dir = save_model_dir(build_model("mini_llama3", len(tokenizer)), tokenizer, tmp_path / "llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: mini_deepseekv3\n")
    run_dir = tmp_path / "run"
    capsys.readouterr()  # the model's saving
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--config", str(recipe), "--model-path", str(model_dir), "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and not run_dir.exists()
    assert "model mini_deepseekv3 does not match the model to fine-tune" in err and "(mini_llama3)" in err


def test_warmup_longer_than_the_run_is_refused(tmp_path, capsys):
    from cli.main import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model", "mini_llama3", "--max-steps", "3", "--warmup-steps", "4", "--output-dir",
              str(run_dir)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not run_dir.exists()
    assert err.strip().splitlines()[-1] == (
        "error: --warmup-steps 4 is more than the run's 3 optimizer steps: the learning rate would never reach --lr")


def test_contradicting_schedule_and_run_options_are_refused(tmp_path, capsys):
    """A warmup that reaches the decay's end skipped the cosine (lr dropped from --lr to --min-lr in one step);
    --overwrite beside --resume was ignored and recorded. A run's config.yaml records neither launch action, so
    `--config RUN/config.yaml` does what its command line says."""
    from cli.main import main
    from minillm.training.trainer import check_schedule

    with pytest.raises(UserError, match="--warmup-ratio 0.6 goes past --decay-ratio 0.5"):
        check_schedule(TrainConfig(stage="pretrain", model="mini_llama3", warmup_ratio=0.6, decay_ratio=0.5).resolve(),
                       100)
    check_schedule(TrainConfig(stage="pretrain", model="mini_llama3", warmup_steps=1).resolve(), 1)  # all warmup
    with pytest.raises(UserError, match="--overwrite starts the run again and --resume continues it"):
        TrainConfig(stage="pretrain", model="mini_llama3", overwrite=True, resume="latest").resolve()
    # a run's config.yaml from before the launch actions were left out of it records `overwrite: true`: the
    # command that resumes it (`--config RUN/config.yaml --resume RUN`) must not be refused for it
    old_record = tmp_path / "old_config.yaml"
    old_record.write_text("stage: pretrain\nmodel: mini_llama3\noverwrite: true\nresume: null\n")
    resumed = build_config("pretrain", str(old_record), {"resume": "latest"}).resolve()
    assert (resumed.overwrite, resumed.resume) == (False, "latest")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model", "mini_llama3", "--max-steps", "20", "--warmup-steps", "15", "--decay-ratio",
              "0.5", "--output-dir", str(run_dir)])
    assert exit_info.value.code == 2 and not run_dir.exists()
    assert "--warmup-steps 15 goes past the end of the decay (0.5 x 20 steps)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model", "mini_llama3", "--model-arg", "num_hidden_layers=1", "--max-steps", "1",
              "--output-dir", str(run_dir), "--overwrite"])
    assert exit_info.value.code == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["overwrite"] is False and saved["resume"] is None and saved["output_dir"] == str(run_dir)


def test_model_args_typo_fails_before_anything_is_written(tmp_path, capsys):
    from cli.main import main
    from minillm.models.registry import build_config as build_model_config

    # a config class keeps unknown keywords as stray attributes: without the check this would train 4 layers
    with pytest.raises(UserError, match="did you mean 'num_hidden_layers'"):
        build_model_config("mini_llama3", "tiny", num_hiden_layers=2)
    assert build_model_config("mini_llama3", "tiny", num_hidden_layers=2).num_hidden_layers == 2
    assert build_model_config("mini_llama3", "tiny", rope_theta=1e4).rope_parameters["rope_theta"] == 1e4  # legacy
    assert build_model_config("mini_deepseekv3", "tiny", num_local_experts=16).n_routed_experts == 16  # alias
    # values take their field's type: YAML reads 1e-6 as a string (its floats need a dot), an int may be a float
    assert build_model_config("mini_llama3", "tiny", rms_norm_eps="1e-6").rms_norm_eps == 1e-6
    assert build_model_config("mini_deepseekv3", "tiny", routed_scaling_factor=2).routed_scaling_factor == 2.0
    assert build_model_config("mini_qwen3_next", "tiny", mlp_only_layers=[1]).mlp_only_layers == [1]
    for name, field, value in (("mini_llama3", "tie_word_embeddings", "maybe"), ("mini_llama3", "dtype", "foo"),
                               ("mini_qwen3_next", "layer_types", "abc"), ("mini_llama3", "initializer_range", -1),
                               ("mini_deepseekv3", "routed_scaling_factor", "abc")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name}: {field} "):
            build_model_config(name, "tiny", **{field: value})
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model", "mini_llama3", "--model-arg", "num_hiden_layers=2", "--max-steps", "1",
              "--output-dir", str(run_dir)])
    assert exit_info.value.code == 2 and not run_dir.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_hiden_layers" in err


@pytest.mark.parametrize("field, value", [
    ("adam_beta1", 1.5), ("adam_beta2", -1.0), ("adam_eps", 0.0), ("weight_decay", -0.1), ("warmup_steps", -3),
    ("max_grad_norm", -1.0), ("peak_tflops", -1.0), ("seed", -1), ("seed", 5_000_000_000),
])
def test_out_of_range_optimizer_options_are_user_errors(field, value):
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')}"):
        TrainConfig(stage="pretrain", model="mini_llama3", **{field: value}).resolve()


def test_defaults_depend_on_stage_and_preset():
    quick = TrainConfig(stage="pretrain", model="mini_deepseekv3").resolve()
    base = TrainConfig(stage="pretrain", model="mini_deepseekv3", preset="base").resolve()
    sft = TrainConfig(stage="sft").resolve()
    assert (quick.seq_len, quick.preset) == (256, "tiny")
    assert (base.seq_len, base.lr, base.min_lr) == (512, 3e-4, 1e-5)
    small = TrainConfig(stage="pretrain", model="mini_llama3", preset="small", lr=1e-3).resolve()
    assert (small.seq_len, small.micro_batch_size, small.lr, small.eval_every) == (256, 16, 1e-3, 200)
    assert (sft.lr, sft.epochs) == (3e-3, 4.0)
    with pytest.raises(UserError, match="not divisible"):
        TrainConfig(stage="pretrain", model="mini_llama3", micro_batch_size=4, global_batch_size=6).resolve()
    with pytest.raises(UserError, match="--model"):
        TrainConfig(stage="pretrain").resolve()


def test_every_shipped_recipe_loads_and_resolves():
    names = shipped_recipes()
    for model in ("llama3", "deepseekv3", "qwen3_next"):
        assert f"pretrain_{model}_base.yaml" in names and f"sft_{model}_base.yaml" in names
    assert "quickstart_pretrain.yaml" in names and "quickstart_sft.yaml" in names
    for name in names:
        stage = "sft" if name.startswith(("sft", "quickstart_sft")) else "pretrain"
        assert load_recipe(f"recipes/{name}")["stage"] == stage, name  # `minillm info --config` reads it
        config = build_config(stage, f"recipes/{name}").resolve()  # also found from any directory by file name
        if name.startswith("pretrain"):
            assert (config.preset, config.seq_len, config.lr, config.min_lr) == ("base", 512, 3e-4, 1e-5)


def test_lr_schedule_warmup_cosine_floor():
    config = TrainConfig(stage="pretrain", model="mini_llama3", lr=1e-3, min_lr=1e-4, warmup_ratio=0.1,
                         decay_ratio=0.9).resolve()
    total = 100
    lrs = [lr_at(s, total, config) for s in range(total)]
    assert lrs[0] == pytest.approx(1e-3 / 10) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # then never increases
    mid = 10 + (90 - 10) // 2  # halfway through the cosine: the mean of lr and min_lr
    assert lrs[mid - 1] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-6)
    assert lrs[89:] == [1e-4] * 11  # the floor
    assert not any(math.isnan(x) for x in lrs)
    # a run so short that the ratio rounds to no warmup step still starts at the peak rate (it used to start on
    # the floor at 2 steps, halfway down the cosine at 3); warmup_ratio=0 means no warmup
    for steps in (1, 2, 3):
        assert lr_at(0, steps, config) == pytest.approx(1e-3), steps
    no_warmup = TrainConfig(stage="pretrain", model="mini_llama3", lr=1e-3, min_lr=1e-4, warmup_ratio=0.0).resolve()
    assert lr_at(0, 100, no_warmup) < 1e-3 and lr_at(0, 100, no_warmup) == pytest.approx(1e-3, rel=1e-3)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from minillm.models.registry import build_model

    model = build_model("mini_llama3", "tiny", vocab_size=128, num_hidden_layers=1, tie_word_embeddings=False)
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(1))  # a bias to classify
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in plain and "model.norm.weight" in plain
    assert "model.layers.0.self_attn.q_proj.bias" in plain
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.weight" in decayed
    assert not any("norm" in n or "embed" in n for n in decayed)


def test_a_user_error_on_any_rank_reaches_the_launching_process(tmp_path, monkeypatch, capsys):
    """Under `--launcher` each rank leaves its UserError message for the parent: rank 0's is repeated as is; when
    only another rank failed (rank 0 saw nothing), the lowest such rank's message is repeated with its rank."""
    from cli.main import report_user_error
    from minillm.training.launch import ranks_error

    error_file = tmp_path / "error.txt"
    monkeypatch.setenv("MINILLM_ERROR_FILE", str(error_file))
    assert ranks_error(error_file) is None
    for rank, message in ((11, "shard 11 is missing"), (3, "shard 3 is missing")):
        monkeypatch.setenv("RANK", str(rank))
        report_user_error(message)
    assert capsys.readouterr().err == ""  # other ranks print nothing themselves
    assert ranks_error(error_file) == "(rank 3) shard 3 is missing"
    monkeypatch.setenv("RANK", "0")
    report_user_error("--data does not exist")
    assert capsys.readouterr().err == ""  # the parent says it, once (rank 0 said it too: the line came twice)
    assert ranks_error(error_file) == "--data does not exist"
    monkeypatch.delenv("MINILLM_ERROR_FILE")  # `accelerate launch` without the launcher: rank 0 says it
    report_user_error("--data does not exist")
    assert capsys.readouterr().err == "error: --data does not exist\n"


def test_grad_norm_is_accurate_for_large_gradients():
    """Clipping scales by this norm; torch's CPU norm of a 4M-element tensor reads about 1e-4 low (pytorch#169237)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (4_000_000, 4097, 3)]
    for p in params:
        p.grad = torch.randn(p.numel()) * 1e-3
    exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    assert abs(grad_norm(params).item() - exact) <= 1e-6 * exact
    assert grad_norm([torch.nn.Parameter(torch.zeros(2))]).item() == 0.0  # no gradient at all


def test_model_args_are_yaml_and_python_none_is_null():
    """--model-arg values are YAML (numbers, booleans, null); `None`, as the config docstrings spell it, is null
    too, and 1e4 a number (both were strings, refused by the config's type checks); other text stays text, and
    nan or infinities are refused."""
    from minillm.training.config import parse_model_args

    got = parse_model_args(["num_hidden_layers=2", "rope_theta=1e4", "loss_chunk_size=None", "head_dim=null",
                            "tie_word_embeddings=true", "initializer_range=5e-3", "hidden_act=silu"])
    assert got == {"num_hidden_layers": 2, "rope_theta": 1e4, "loss_chunk_size": None, "head_dim": None,
                   "tie_word_embeddings": True, "initializer_range": 0.005, "hidden_act": "silu"}
    assert parse_model_args(["a=nan", "b='1e4'", "c=inf"]) == {"a": "nan", "b": "1e4", "c": "inf"}  # text stays text
    for value in (".nan", ".inf", "-.inf"):
        with pytest.raises(UserError, match="must be a finite number"):
            parse_model_args([f"rope_theta={value}"])

