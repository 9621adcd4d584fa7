"""Peaks, MFU and the two benchmark scripts (a tiny smoke run each; the real numbers are in the README)."""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from minillm.errors import UserError
from minillm.models.registry import MODEL_NAMES, build_config
from minillm.paths import check_output_file, write_output_file
from minillm.training import perf

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_arithmetic():
    # 1,000 tok/s x 6e9 FLOP/token = 6 TFLOP/s achieved on a 10 TFLOP/s device: 60%
    assert perf.mfu(1000.0, 6e9, 10e12) == pytest.approx(0.6)
    assert perf.mfu(1000.0, 6e9, 10e12, devices=2) == pytest.approx(0.3)
    assert perf.mfu(1000.0, 6e9, None) is None
    assert perf.mfu(1000.0, 6e9, 0.0) is None


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),  # the specific entry wins over the generic "H100"
        ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
    ],
)
def test_gpu_peak_table(name, dtype, tflops):
    assert perf.gpu_peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_gpu_peak_unknown():
    assert perf.gpu_peak_flops("Some Future Accelerator", "bf16") is None
    assert perf.gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    with pytest.raises(ValueError):
        perf.dtype_name("int8")


def test_cpu_peak_is_measured():
    flops = perf.measure_cpu_peak_flops("fp32", size=256, seconds=0.05)
    assert 1e8 < flops < 1e14  # a real rate: more than 0.1 GFLOP/s, less than 100 TFLOP/s
    assert perf.device_peak_flops("meta") is None


def test_cpu_peak_is_the_faster_of_torch_and_onednn(monkeypatch):
    """Both kernels are timed and the faster one is the peak (oneDNN is the models' fp32 kernel; on a Zen 5 CPU it
    is twice `torch.mm`'s MKL). Each kernel here "takes" a fixed time on a fake clock."""
    from minillm.models.layers import linear as dense

    if not dense.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    size, now = 64, [0.0]

    def kernel(seconds):
        def run(*args, **kwargs):
            now[0] += seconds
        return run

    for torch_seconds, onednn_seconds in ((2.0, 1.0), (1.0, 4.0)):
        monkeypatch.setattr(perf.torch, "matmul", kernel(torch_seconds))
        monkeypatch.setattr(dense, "onednn_mm", kernel(onednn_seconds))
        flops = perf.measure_cpu_peak_flops("fp32", size=size, seconds=0.01, clock=lambda: now[0])
        assert flops == pytest.approx(2 * size**3 / min(torch_seconds, onednn_seconds))


def test_cpu256_preset_is_the_issue_config():
    for name in MODEL_NAMES:
        preset, overrides = perf.preset_and_overrides(name, perf.CPU_BENCH_PRESET)
        config = build_config(name, preset, **overrides)
        assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (256, 4, 8000)
    assert perf.preset_and_overrides("mini_llama3", "base") == ("base", {})


def test_bare_train_step_updates_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.lm_head.weight.detach().clone()
    loss = perf.bare_train_step(model, optimizer, torch.randint(0, 64, (2, 8)), "bf16")
    assert torch.isfinite(loss) and loss.dim() == 0
    assert not torch.equal(before, model.lm_head.weight)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


@pytest.mark.parametrize("script", ["bench_models", "bench_train"])
def test_bench_scripts_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    assert "--dtype" in capsys.readouterr().out


def test_bench_models_smoke(tmp_path, capsys):
    bench = load_script("bench_models")
    [res] = bench.main(["--models", "mini_llama3", "--preset", "tiny", "--batch", "1", "--seq", "16",
                        "--steps", "1", "--rounds", "2", "--warmup", "0", "--cpu-matmul", "both",
                        "--json", str(tmp_path / "models.json")])
    config = json.loads((tmp_path / "models.json").read_text())["config"]
    assert config["threads"] == torch.get_num_threads()  # the real count, not the unset option (null)
    assert res["reference"] == "LlamaForCausalLM"
    assert res["ours_tokens_per_s"] > 0 and res["reference_tokens_per_s"] > 0 and res["ratio"] > 0
    assert res["ours_torch_kernels_tokens_per_s"] > 0 and res["ratio_torch_kernels"] > 0  # the third runner
    # identical weights: the first losses agree (mini_llama3 has no auxiliary terms), whichever fp32 kernel
    for runner in ("ours", "ours_torch_kernels"):
        assert res["first_loss"][runner] == pytest.approx(res["first_loss"]["reference"], abs=1e-4)
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "torch kernels" in out


def test_bench_train_smoke(tmp_path, capsys):
    bench = load_script("bench_train")
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2",
                      "--warmup", "1", "--rounds", "1", "--against-reference", "--log-every", "1",
                      "--json", str(tmp_path / "res.json")])
    assert res["tokens_per_s"] > 0 and res["reference_tokens_per_s"] > 0 and res["ratio"] > 0
    assert 0 < res["mfu"] < 1.5 and res["peak_flops"] > 0 and res["peak_memory_bytes"] > 0
    assert set(res["shares"]) == set(bench.STAGES)
    assert sum(res["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert res["shares"]["forward"] > 0 and res["shares"]["backward"] > 0 and res["shares"]["optimizer"] > 0
    assert (tmp_path / "res.json").is_file()
    assert "ratio" in capsys.readouterr().out


def test_bench_train_times_the_training_loop_not_the_prefetch_thread(monkeypatch, tmp_path):
    """With batches built ahead in a thread (as on a GPU), the steps are still those of the training loop: as many
    timed steps per round as asked, each pairing with one reference step. Also `--profile` and
    `--finite-check-in-step` (the trainer's own choice is back in place afterwards)."""
    bench = load_script("bench_train")
    monkeypatch.setattr(bench.trainer_module, "prefetch_batches", lambda device: True)
    timers, run_round = [], bench.run_trainer_round
    monkeypatch.setattr(bench, "run_trainer_round", lambda *a, **k: timers.append(run_round(*a, **k)) or timers[-1])
    choice = bench.trainer_module.skips_on_device
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "3",
                      "--warmup", "1", "--against-reference", "--finite-check-in-step",
                      "--profile", str(tmp_path / "profile.txt")])
    assert [len(t.step_times) for t in timers] == [3, 3]  # the timed round, then the profiled one
    assert len(timers[0].between_times) == 3 and len(res["ratio_steps"]) == 3
    assert res["finite_check_in_step"] and bench.trainer_module.skips_on_device is choice
    assert "ProfilerStep" in (tmp_path / "profile.txt").read_text()


def test_bench_train_both_dtypes_in_one_run(tmp_path, capsys, monkeypatch):
    """`--dtype fp32,bf16` alternates the precisions' rounds and reports their per-round speed ratio, and each
    precision's own peak memory (reset before each round; a fake meter here: 1, 2, 3, 4 kB in round order)."""
    bench = load_script("bench_train")
    readings = iter([1024.0, 2048.0, 3072.0, 4096.0])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(bench, "reset_peak_memory", lambda device: True)
    monkeypatch.setattr(bench, "peak_memory", lambda device: next(readings))
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2",
                      "--warmup", "1", "--rounds", "2", "--dtype", "fp32,bf16", "--json", str(tmp_path / "r.json")])
    assert res["fp32"]["dtype"] == "fp32" and res["bf16"]["dtype"] == "bf16"
    ratios = res["dtype_ratio"]["ratio_rounds"]
    assert len(ratios) == 2
    rounds = zip(res["bf16"]["tokens_per_s_rounds"], res["fp32"]["tokens_per_s_rounds"], strict=True)
    assert ratios == [bf16 / fp32 for bf16, fp32 in rounds]
    assert json.loads((tmp_path / "r.json").read_text())["dtype_ratio"]["ratio"] == res["dtype_ratio"]["ratio"]
    assert "bf16 / fp32 tokens/s" in capsys.readouterr().out
    assert list((tmp_path / "tmp").iterdir()) == []  # each round's run once stayed beside it (`.previous-<time>`)
    # rounds run fp32, bf16, fp32, bf16: each dtype's peak is the largest of its own rounds
    assert (res["fp32"]["peak_memory_bytes"], res["bf16"]["peak_memory_bytes"]) == (3072.0, 4096.0)
    assert res["fp32"]["peak_memory_scope"] == res["bf16"]["peak_memory_scope"] == "rounds"
    # where the peak cannot be reset, the output says so instead of passing it off as the dtype's own
    bench.print_result(dict(res["bf16"], peak_memory_scope="process"))
    assert "lifetime peak" in capsys.readouterr().out


def test_bench_train_resets_the_cpu_peak_memory():
    """On Linux the CPU peak (VmHWM) is reset through /proc/self/clear_refs, so each dtype measures its own."""
    bench = load_script("bench_train")
    cpu = torch.device("cpu")
    try:  # absent off Linux, read-only in some containers: then the benchmark says its peak is the lifetime's
        Path("/proc/self/clear_refs").write_text("5")
        resettable = bench.resident_peak() is not None
    except OSError:
        resettable = False
    assert bench.reset_peak_memory(cpu) is resettable
    assert bench.peak_memory(cpu) > 0


def test_bench_train_reads_shards_of_another_tokenizer(tmp_path):
    """`--data` shards built with a tokenizer other than the shipped one: the benchmark trains on them with the
    tokenizer their manifest names, or the one `--tokenizer` gives when that directory has moved."""
    from inference_helpers import tiny_texts

    from minillm.data.pretrain import build_pretrain_shards
    from minillm.tokenizer import train_tokenizer

    train_tokenizer(tiny_texts(), tmp_path / "tok", vocab_size=320, min_frequency=1, show_progress=False)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_texts(200, seed=1)), encoding="utf-8")
    build_pretrain_shards([str(corpus)], tmp_path / "shards", tmp_path / "tok", progress=False)
    bench = load_script("bench_train")
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "1", "--seq", "16", "--steps", "1",
                      "--warmup", "0", "--data", str(tmp_path / "shards")])
    assert res["tokens_per_s"] > 0
    (tmp_path / "tok").rename(tmp_path / "moved_tok")
    with pytest.raises(UserError, match="--tokenizer"):
        bench.shards_tokenizer(str(tmp_path / "shards"), None)
    assert bench.shards_tokenizer(str(tmp_path / "shards"), str(tmp_path / "moved_tok")) == str(tmp_path / "moved_tok")
    with pytest.raises(UserError, match="only with --data"):
        bench.shards_tokenizer(None, str(tmp_path / "moved_tok"))


def test_bench_decode_writes_json_values(tmp_path):
    """The options in bench_decode's JSON are JSON values (null, numbers, lists), not their Python spellings."""
    bench = load_script("bench_decode")
    out = tmp_path / "decode.json"
    bench.main(["--models", "mini_llama3", "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2",
                "--repeats", "1", "--device", "cpu", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["args"]["threads"] is None and saved["args"]["model"] is None
    assert saved["args"]["batch_sizes"] == [1] and saved["args"]["new_tokens"] == 2
    assert saved["args"]["json"] == str(out)
    assert {row["engine"] for row in saved["results"]} >= {"generate()", "minillm"}


# ---------------------------------------------------------------------------------------------------------------
# Bad command lines: one line and exit code 2, before any run


def test_int_argument_types():
    assert perf.positive_int("3") == 3 and perf.non_negative_int("0") == 0 and perf.int_at_least(2)("2") == 2
    for parse, text in ((perf.positive_int, "0"), (perf.positive_int, "-1"), (perf.positive_int, "x"),
                        (perf.non_negative_int, "-1"), (perf.int_at_least(2), "1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_run_main_turns_a_user_error_into_one_line(capsys):
    def bad() -> None:
        raise UserError("--data x: data directory does not exist")

    with pytest.raises(SystemExit) as exit_info:
        perf.run_main(bad)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --data x: data directory does not exist\n"
    perf.run_main(lambda: None)  # no error: returns


def test_check_output_file(tmp_path):
    (tmp_path / "file").write_text("")
    check_output_file(None)
    check_output_file(tmp_path / "new" / "dir" / "x.json")  # missing directories are created when writing
    with pytest.raises(UserError, match="--json .*not a directory"):
        check_output_file(tmp_path / "file" / "x.json", "--json")
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path, "--json")
    write_output_file(tmp_path / "new" / "dir" / "x.json", "{}")
    assert (tmp_path / "new" / "dir" / "x.json").read_text() == "{}"


BAD_OPTION_VALUES = [
    ("bench_models", ["--steps", "-1"]),
    ("bench_models", ["--rounds", "0"]),
    ("bench_train", ["--steps", "0"]),
    ("bench_train", ["--rounds", "0"]),
    ("bench_train", ["--batch", "0"]),
    ("bench_data", ["--repeat", "0"]),
    ("bench_attention", ["--steps", "0"]),
    ("bench_attention", ["--batch", "0"]),
    ("bench_attention", ["--backends", "foo"]),
    ("bench_decode", ["--new-tokens", "1"]),
    ("bench_decode", ["--repeats", "0"]),
    ("bench_decode", ["--models", "foo"]),
    ("bench_expert_parallel", ["--ep", "0"]),
    ("make_sample_data", ["--pretrain-docs", "-5"]),
]


@pytest.mark.parametrize(("script", "argv"), BAD_OPTION_VALUES)
def test_bad_option_values_stop_before_the_run(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(argv)
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"argument {argv[0]}" in line


# (script, argv, the function that runs the benchmark: it must not be reached)
USER_ERRORS = [
    ("bench_train", ["--model-arg", "no_equals_sign"], "measure"),
    ("bench_train", ["--json", "{file}/x.json"], "measure"),
    ("bench_train", ["--profile", "{file}/p.txt"], "measure"),
    ("bench_models", ["--json", "{file}/x.json"], "bench_model"),
    ("bench_attention", ["--json", "{file}/x.json"], "bench_one"),
    ("bench_decode", ["--json", "{file}/x.json"], "load_models"),
    ("bench_decode", ["--model", "{missing}"], None),
    ("bench_data", ["--input", "{missing}"], None),
    ("bench_expert_parallel", ["--json", "{file}/x.json"], "run_one"),
    ("bench_expert_parallel", ["--ep", "1", "3"], "run_one"),  # 3 divides neither 8 experts nor 2 processes
    ("bench_expert_parallel", ["--preset", "bogus"], "run_one"),
    ("bench_train", ["--compile-mode", "max-autotune"], "measure"),  # without --compile: ignored, unsaid
    ("bench_train", ["--profile", "{missing}.txt", "--steps", "1"], "measure"),  # no whole step to profile
]
if not torch.cuda.is_available():
    USER_ERRORS += [("bench_models", ["--device", "cuda"], "bench_model"),
                    ("bench_attention", ["--device", "cuda"], "bench_one"),
                    ("bench_train", ["--device", "cuda"], "measure"),
                    ("bench_expert_parallel", ["--device", "cuda"], "run_one")]


@pytest.mark.parametrize(("script", "argv", "runner"), USER_ERRORS)
def test_user_errors_are_one_line_before_the_run(script, argv, runner, tmp_path, monkeypatch, capsys):
    """An unknown model, a bad `--model-arg`, a missing input or an unwritable `--json` is one `error:` line and
    exit code 2 under `perf.run_main` (the scripts' `__main__`), found before the benchmark runs."""
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file", missing=tmp_path / "missing") for a in argv]
    module = load_script(script)
    if runner is not None:
        def never(*args, **kwargs):
            raise AssertionError(f"{runner} ran before the bad option was found")
        monkeypatch.setattr(module, runner, never)
    with pytest.raises(SystemExit) as exit_info:
        perf.run_main(lambda: module.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(("script", "argv"), [("bench_train", ["--steps", "0"]),
                                              ("bench_models", ["--json", "{file}/x.json"])])
def test_scripts_fail_fast_from_the_command_line(script, argv, tmp_path):
    """The scripts as commands: exit code 2 and one `error:` line, in seconds (no training first)."""
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bench_train_runs_sft_style_packed_rows(capsys):
    """`--packed-docs N`: rows of N documents whose positions restart, prompts and padding without targets, every
    fourth row padded; the trainer runs them (the model's packed-attention path) and the result says so. With the
    reference, which takes plain token rows, it is refused in one line."""
    bench = load_script("bench_train")
    rows = bench.PackedChats(vocab_size=64, seq_len=32, docs=3, rows=8)
    for index in range(8):
        row = rows[index]
        real = int(row["attention_mask"].sum())
        assert real == (24 if index % 4 == 3 else 32)
        assert int((row["position_ids"][:real] == 0).sum()) == 3 and (row["labels"][real:] == -100).all()
        assert (row["labels"][:real] == -100).any() and (row["labels"][:real] != -100).any()
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "2",
                      "--warmup", "1", "--packed-docs", "3"])
    assert res["packed_docs"] == 3 and res["tokens_per_s"] > 0
    assert "3 packed documents per row" in capsys.readouterr().out
    with pytest.raises(UserError, match="--packed-docs"):
        bench.main(["--model", "mini_llama3", "--packed-docs", "3", "--against-reference"])

