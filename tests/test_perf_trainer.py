"""The trainer's speed options: fused AdamW on the CPU, a measured CPU peak for MFU, regional torch.compile."""

import pytest
import torch
from torch import nn

from minillm.errors import UserError
from minillm.models.registry import build_model
from minillm.training.config import TrainConfig
from minillm.training.metrics import peak_flops
from minillm.training.optim import build_optimizer
from minillm.training.trainer import compile_layers


def tiny_llama():
    return build_model("mini_llama3", "tiny", vocab_size=128, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def test_adamw_is_fused_on_cpu():
    optimizer = build_optimizer(tiny_llama(), TrainConfig(model="mini_llama3").resolve())
    assert optimizer.defaults["fused"] is True


def test_cpu_peak_is_measured_once_per_dtype():
    fp32 = peak_flops(None, "cpu", "fp32")
    assert fp32 is not None and 1e8 < fp32 < 1e14
    assert peak_flops(None, "cpu", "fp32") == fp32  # cached: the trainer asks once per run, tests many times
    assert peak_flops(2.0, "cpu", "fp32") == pytest.approx(2e12)  # --peak-tflops wins


def test_compile_layers_compiles_each_decoder_layer(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append((type(self).__name__, k)))
    model = tiny_llama()
    assert compile_layers(model) == 2
    assert compiled == [("MiniLlama3DecoderLayer", {"mode": None})] * 2
    compiled.clear()
    assert compile_layers(model, "reduce-overhead") == 2
    assert compiled == [("MiniLlama3DecoderLayer", {"mode": "reduce-overhead"})] * 2


def test_compile_flag_is_a_train_option():
    assert TrainConfig(model="mini_llama3", compile=True).resolve().compile is True
    overhead = TrainConfig(model="mini_llama3", compile=True, compile_mode="reduce-overhead").resolve()
    assert overhead.compile_mode == "reduce-overhead"
    with pytest.raises(UserError, match="does nothing without --compile"):
        TrainConfig(model="mini_llama3", compile_mode="reduce-overhead").resolve()
    with pytest.raises(UserError, match="--compile-mode must be one of default, reduce-overhead"):
        TrainConfig(model="mini_llama3", compile_mode="fast").resolve()
    assert "compile" in TrainConfig.field_names()
    assert torch.compile is not None


@pytest.mark.parametrize("name", ["mini_deepseekv3", "mini_qwen3_next"])
def test_compiled_layers_train_like_eager_moe(name):
    """`--compile` really compiles our layers (grouped experts, MLA, DeltaNet, chunked loss outside) on the CPU in
    fp32 and gives the eager loss and gradients: the MoE experts' grouped matmul must not break tracing."""
    torch.manual_seed(0)
    eager = build_model(name, "tiny", vocab_size=128, num_hidden_layers=2).train()
    compiled = build_model(name, "tiny", vocab_size=128, num_hidden_layers=2).train()
    compiled.load_state_dict(eager.state_dict())
    assert compile_layers(compiled) >= 2  # (+ the MTP block of mini_deepseekv3)
    ids = torch.randint(0, 128, (2, 64))
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_cpu_peak_is_corrected_when_the_run_beats_it(monkeypatch):
    """A peak measured while other jobs held the cores is too low (MFU > 100%): it is re-measured, and never
    less than what the run achieved; a run below the peak changes nothing and measures nothing."""
    from minillm.training import metrics, perf

    key = ("fp32", torch.get_num_threads())
    monkeypatch.setitem(metrics._CPU_PEAKS, key, 1e9)
    monkeypatch.setattr(perf, "measure_cpu_peak_flops", lambda *a, **k: pytest.fail("measured again"))
    assert metrics.cpu_peak_at_least("fp32", 5e8) == 1e9
    monkeypatch.setattr(perf, "measure_cpu_peak_flops", lambda *a, **k: 3e9)
    assert metrics.cpu_peak_at_least("fp32", 2e9) == 3e9  # the new measurement
    assert metrics.cpu_peak_at_least("fp32", 7e9) == 7e9  # the run's own rate is a lower bound of the peak
    assert metrics.peak_flops(None, "cpu", "fp32") == 7e9
