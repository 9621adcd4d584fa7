"""The fp32 CPU matmuls through oneDNN (minillm/models/layers/linear.py): same numbers and gradients as torch's
kernels, taken only where they apply, and switchable off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.errors import UserError
from minillm.models.layers import linear as dense
from minillm.models.layers.linear import (
    Linear,
    addmm_,
    cpu_matmul_backend,
    force_cpu_matmul,
    linear,
    mm,
    onednn_applies,
)
from minillm.models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pin_onednn():
    """The kernel under test, whichever backend this machine's CPU gets by default (MKL on Intel CPUs)."""
    with force_cpu_matmul("onednn"):
        yield


def needs_onednn(test):
    """Run `test` with oneDNN pinned; skipped where this torch has no working oneDNN linear."""
    skip = pytest.mark.skipif(not dense.onednn_available(), reason="this torch has no oneDNN linear")
    return skip(pytest.mark.usefixtures("pin_onednn")(test))


@pytest.fixture(autouse=True)
def onednn_for_small_products(monkeypatch):
    """The tests' products are small; below `MIN_ONEDNN_MACS` they would all keep torch's kernel."""
    monkeypatch.setattr(dense, "MIN_ONEDNN_MACS", 0)


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _grads(fn, x, weight, bias):
    out = fn(x, weight, bias)
    grad_out = torch.randn_like(out)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad_out))


@needs_onednn
def test_linear_matches_torch_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    torch.manual_seed(1)
    ours = _grads(linear, x, weight, bias)
    torch.manual_seed(1)
    expected = _grads(F.linear, x, weight, bias)
    for a, b in zip(ours, expected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_fp32_cpu_matmuls_run_in_onednn_and_the_switch_turns_it_off():
    x, weight = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    with OpNames() as ops:
        linear(x, weight).sum().backward()
    assert ops.names.count("_linear_pointwise") == 3  # forward, grad of x, grad of weight
    assert not {"mm", "addmm", "linear"} & set(ops.names)

    with force_cpu_matmul("torch"), OpNames() as ops:
        linear(x, weight).sum().backward()
        a = mm(x.detach(), weight.detach().t())
        addmm_(torch.zeros(5, 6), x.detach(), weight.detach().t())
    assert "_linear_pointwise" not in ops.names and {"mm", "addmm_"} <= set(ops.names)
    torch.testing.assert_close(a, x.detach() @ weight.detach().t())


@needs_onednn
def test_mm_and_addmm_match_torch_on_strided_operands():
    a, b = torch.randn(30, 12), torch.randn(20, 30)
    torch.testing.assert_close(mm(a.t(), b.t()), a.t() @ b.t())  # both operands transposed views
    acc = torch.randn(12, 20)
    expected = acc + a.t() @ b.t()
    torch.testing.assert_close(addmm_(acc, a.t(), b.t()), expected)
    assert mm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)  # no rows


def test_onednn_is_not_used_under_autocast_or_for_other_dtypes():
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    assert not onednn_applies(x.double(), weight.double(), 96)
    assert not onednn_applies(x.bfloat16(), weight.bfloat16(), 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(x, weight, 96)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast's bf16 linear, as F.linear gives
    assert linear(x.double(), weight.double()).dtype == torch.float64


@needs_onednn
def test_small_products_keep_torchs_kernel(monkeypatch):
    """Products under a million multiply-adds (a tiny model's one-token decode step) stay in torch's kernel, whose
    fixed cost per call is lower; larger ones go to oneDNN."""
    monkeypatch.setattr(dense, "MIN_ONEDNN_MACS", 1 << 20)
    small, weight = torch.randn(1, 64), torch.randn(300, 64)  # 19,200 multiply-adds
    large = torch.randn(64, 64)  # 64 x 64 x 300 = 1.2 million
    with OpNames() as ops:
        linear(small, weight)
    assert "_linear_pointwise" not in ops.names
    with OpNames() as ops:
        linear(large, weight)
    assert "_linear_pointwise" in ops.names


@pytest.mark.parametrize(("cpuinfo", "machine", "expected"), [
    ("vendor_id\t: AuthenticAMD\n", "x86_64", "onednn"),  # MKL runs AVX2 code there: oneDNN is twice as fast
    ("vendor_id\t: GenuineIntel\n", "x86_64", "torch"),  # MKL's own CPUs: MKL is the faster
    ("vendor_id\t: HygonGenuine\n", "x86_64", "onednn"),
    ("", "aarch64", "torch"),
])
def test_the_default_backend_follows_the_cpu_maker(cpuinfo, machine, expected, monkeypatch, tmp_path):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{cpuinfo}flags\t\t: avx512f\n")
    monkeypatch.setattr(dense, "CPUINFO", str(tmp_path / "cpuinfo"))
    monkeypatch.setattr(dense.platform, "machine", lambda: machine)
    assert dense.default_cpu_matmul_backend() == expected


def test_unknown_backend_is_a_user_error(monkeypatch):
    monkeypatch.setenv("MINILLM_CPU_MATMUL", "blas")
    with pytest.raises(UserError, match="MINILLM_CPU_MATMUL='blas'.*onednn, torch"):
        cpu_matmul_backend()
    monkeypatch.setenv("MINILLM_CPU_MATMUL", "torch")
    assert cpu_matmul_backend() == "torch"
    with pytest.raises(ValueError, match="unknown CPU matmul backend"):
        with force_cpu_matmul("mkl"):
            pass


def test_linear_module_keeps_nn_linear_parameters():
    layer = Linear(8, 3, bias=False)
    assert isinstance(layer, torch.nn.Linear) and set(dict(layer.named_parameters())) == {"weight"}
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())


@needs_onednn
@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_model_train_step_is_the_same_with_either_kernel(name):
    """A whole model's loss and gradients agree between oneDNN and torch's kernels to fp32 rounding."""
    model = build_model(name, "tiny", vocab_size=300, hidden_size=64, num_hidden_layers=2)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("onednn", "torch"):
        model.zero_grad(set_to_none=True)
        with force_cpu_matmul(backend):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None})
    (loss_a, grads_a), (loss_b, grads_b) = results["onednn"], results["torch"]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-3, atol=1e-5, msg=key)


@needs_onednn
def test_compiled_linear_runs_onednn_through_its_custom_op():
    """Under torch.compile the layer still computes in oneDNN (inductor lowers the raw kernel only for frozen
    weights, so compiled graphs call it through `minillm::onednn_linear`), with the eager numbers."""
    from torch.profiler import profile

    torch.manual_seed(0)
    block = torch.nn.Sequential(Linear(32, 64, bias=False), torch.nn.SiLU(), Linear(64, 32, bias=False))
    x = torch.randn(3, 5, 32, requires_grad=True)
    eager = block(x)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(block)
    with profile() as prof:
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    names = {event.key for event in prof.key_averages()}
    assert "minillm::onednn_linear" in names and not {"aten::mm", "aten::addmm"} & names
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, grad_eager)


@needs_onednn
def test_in_place_weight_updates_are_seen():
    """The optimizer updates weights in place (same storage, new values): oneDNN must never compute with a packed
    copy of the old weight. Training steps on either kernel give the same losses step after step."""
    from minillm.training import perf

    layer = Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), 2 * before)

    torch.manual_seed(0)
    models = {"onednn": build_model("mini_llama3", "tiny", vocab_size=300, hidden_size=64, num_hidden_layers=2)}
    models["torch"] = copy.deepcopy(models["onednn"])
    optimizers = {name: perf.bare_optimizer(model) for name, model in models.items()}
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = {name: [] for name in models}
    for _ in range(4):
        for name, model in models.items():
            with force_cpu_matmul(name):
                losses[name].append(perf.bare_train_step(model, optimizers[name], ids).item())
    assert losses["onednn"][-1] < losses["onednn"][0]  # it trains
    assert losses["onednn"] == pytest.approx(losses["torch"], rel=1e-5)


@needs_onednn
def test_the_kernel_only_ever_gets_a_dense_weight(monkeypatch):
    """A weight operand that is neither contiguous nor a transposed contiguous matrix sends oneDNN to a reference
    kernel ~2,000x slower. The weight gradient of `out.sum()` (a broadcast output gradient) and a weight sliced out
    of wider rows must both reach the kernel dense, and still give torch's numbers."""
    weights_seen = []
    kernel = dense._ONEDNN_LINEAR

    def recording(x, weight, *args):
        weights_seen.append(weight.is_contiguous() or weight.t().is_contiguous())
        return kernel(x, weight, *args)

    monkeypatch.setattr(dense, "_ONEDNN_LINEAR", recording)
    torch.manual_seed(0)
    wide = torch.randn(40, 48)
    for weight in (torch.randn(40, 24), wide[:, :24]):  # contiguous; a slice of wider rows
        weight = weight.detach().requires_grad_()
        x = torch.randn(3, 7, 24, requires_grad=True)
        grad_x, grad_w = torch.autograd.grad(linear(x, weight).sum(), (x, weight))
        expected = torch.autograd.grad(F.linear(x, weight).sum(), (x, weight))
        torch.testing.assert_close(grad_x, expected[0])
        torch.testing.assert_close(grad_w, expected[1])
    assert len(weights_seen) == 6 and all(weights_seen)


def test_a_changed_or_broken_kernel_falls_back_to_torch(monkeypatch):
    """The oneDNN op is internal to torch: if it rejects our call or answers wrong, the models use torch's kernels."""
    def rejects(*args):
        raise TypeError("_linear_pointwise() takes 5 arguments")

    for kernel in (rejects, lambda x, w, *args: x @ w.t() + 1):
        monkeypatch.setattr(dense, "_ONEDNN_LINEAR", kernel)
        dense.onednn_available.cache_clear()
        try:
            assert not dense.onednn_available() and cpu_matmul_backend() == "torch"
            x, weight = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8)
            torch.testing.assert_close(linear(x, weight), x @ weight.t())
        finally:
            dense.onednn_available.cache_clear()


@pytest.mark.parametrize("variable", ["MINILLM_CPU_MATMUL", "MINILLM_ATTENTION_BACKEND"])
def test_a_misspelt_kernel_variable_stops_the_command_before_it_writes(variable, tmp_path, monkeypatch, capsys):
    """Every command checks the kernel-choice variables first: one line, exit code 2, no run directory begun."""
    from cli_helpers import run_cli_err

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "blas")
    code, err = run_cli_err(["pretrain", "--model", "mini_llama3", "--max-steps", "1"], capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {variable}='blas': known backends are "
                                                      + ", ".join(("onednn", "torch") if "MATMUL" in variable
                                                                  else ("sdpa", "flex", "flash", "math"))]
    assert list(tmp_path.iterdir()) == []
