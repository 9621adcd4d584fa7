"""Peaks, MFU and the two benchmark scripts (a tiny smoke run each; the real numbers are in the README)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minillm.models.registry import MODEL_NAMES, build_config
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


def test_bench_models_smoke(capsys):
    bench = load_script("bench_models")
    [res] = bench.main(["--models", "mini_llama3", "--preset", "tiny", "--batch", "1", "--seq", "16",
                        "--steps", "1", "--rounds", "2", "--warmup", "0", "--cpu-matmul", "both"])
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
    `--no-nonfinite-check` (the trainer's check is back in place afterwards)."""
    bench = load_script("bench_train")
    monkeypatch.setattr(bench.trainer_module, "prefetch_batches", lambda device: True)
    timers, run_round = [], bench.run_trainer_round
    monkeypatch.setattr(bench, "run_trainer_round", lambda *a, **k: timers.append(run_round(*a, **k)) or timers[-1])
    check = bench.trainer_module.step_is_bad
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "3",
                      "--warmup", "1", "--against-reference", "--no-nonfinite-check",
                      "--profile", str(tmp_path / "profile.txt")])
    assert [len(t.step_times) for t in timers] == [3, 3]  # the timed round, then the profiled one
    assert len(timers[0].between_times) == 3 and len(res["ratio_steps"]) == 3
    assert not res["nonfinite_check"] and bench.trainer_module.step_is_bad is check
    assert "ProfilerStep" in (tmp_path / "profile.txt").read_text()


def test_bench_train_both_dtypes_in_one_run(tmp_path, capsys):
    """`--dtype fp32,bf16` alternates the precisions' rounds and reports their per-round speed ratio."""
    bench = load_script("bench_train")
    res = bench.main(["--model", "mini_llama3", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "2",
                      "--warmup", "1", "--rounds", "2", "--dtype", "fp32,bf16", "--json", str(tmp_path / "r.json")])
    assert res["fp32"]["dtype"] == "fp32" and res["bf16"]["dtype"] == "bf16"
    ratios = res["dtype_ratio"]["ratio_rounds"]
    assert len(ratios) == 2
    rounds = zip(res["bf16"]["tokens_per_s_rounds"], res["fp32"]["tokens_per_s_rounds"], strict=True)
    assert ratios == [bf16 / fp32 for bf16, fp32 in rounds]
    assert json.loads((tmp_path / "r.json").read_text())["dtype_ratio"]["ratio"] == res["dtype_ratio"]["ratio"]
    assert "bf16 / fp32 tokens/s" in capsys.readouterr().out
