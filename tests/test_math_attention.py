"""The CPU math-attention kernel (minillm/models/layers/math_attention.py) against SDPA, and when it is chosen.

In fp64 both compute the same function, so outputs and gradients agree to rounding: causal and masked, grouped
heads, MLA's unequal head dims, a softmax scale. In bf16 the kernel rounds its scores once more than SDPA's
fused kernel; its error against an fp64 reference stays within twice SDPA's. A whole mini_llama3 training step
under CPU bf16 autocast takes the kernel and matches the SDPA step.
"""

import pytest
import torch
import torch.nn.functional as F
from model_checks import random_ids

import minillm  # noqa: F401  (registers the Auto classes)
from minillm.errors import UserError
from minillm.models.layers import attention, math_attention
from minillm.models.layers.attention import (
    dense_backend,
    force_attention_backend,
    prepare_attention,
    sdpa_attention,
)
from minillm.models.layers.math_attention import math_attention_applies
from minillm.models.registry import build_model


@pytest.fixture(autouse=True)
def _no_pinned_backend(monkeypatch):
    monkeypatch.delenv("MINILLM_ATTENTION_BACKEND", raising=False)


def qkv(heads=4, kv_heads=2, qk_dim=16, v_dim=16, batch=2, length=12, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, length, qk_dim), (batch, kv_heads, length, qk_dim), (batch, kv_heads, length, v_dim))
    return [torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def attend(backend, q, k, v, mask=None, scale=None):
    """Output (B, L, H, Dv) and the gradients of a fixed, non-uniform function of it, through `backend`."""
    with force_attention_backend(backend):
        out = sdpa_attention(q, k, v, mask, scale=scale)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).sin()
    grads = torch.autograd.grad((out.double() * weights).sum(), (q, k, v))
    return [out, *grads]


def packed_mask(batch=2, length=12):
    """Row 0: documents of 5 and 7 tokens; row 1: one document of 9 tokens, then 3 of padding."""
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(9)) + [0, 0, 0]])[:batch]
    pad = torch.ones(batch, length, dtype=torch.long)
    pad[1:, 9:] = 0
    return prepare_attention(length, length, pad, pos, None, batch).dense_mask()  # (B, 1, L, L), True = may see


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "packed-mask"])
@pytest.mark.parametrize(
    "heads,kv_heads,qk_dim,v_dim,scale",
    [(4, 2, 16, 16, None), (4, 4, 24, 16, 0.3), (6, 1, 8, 12, None)],
    ids=["gqa", "mla-dims", "mqa-odd-dims"],
)
def test_math_kernel_equals_sdpa_in_fp64(masked, heads, kv_heads, qk_dim, v_dim, scale):
    q, k, v = qkv(heads, kv_heads, qk_dim, v_dim)
    mask = packed_mask() if masked else None
    expected = attend("sdpa", q, k, v, mask, scale)
    got = attend("math", q, k, v, mask, scale)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), f"{name}: {(a - b).abs().max()}"


def test_math_kernel_bf16_error_is_sdpa_like():
    q, k, v = qkv(heads=4, kv_heads=2, qk_dim=64, v_dim=64, batch=2, length=128)
    exact = attend("sdpa", q, k, v)
    errors = {}
    for backend in ("sdpa", "math"):
        low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
        got = attend(backend, *low)
        assert got[0].dtype == torch.bfloat16 and torch.isfinite(got[0]).all()
        errors[backend] = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, exact, strict=True)]
    for name, math_err, sdpa_err in zip(("out", "dq", "dk", "dv"), errors["math"], errors["sdpa"], strict=True):
        assert math_err < 2 * sdpa_err + 1e-3, f"{name}: math {math_err:.2e}, sdpa {sdpa_err:.2e}"


def test_math_kernel_under_autocast_takes_mixed_dtypes():
    """Under CPU bf16 autocast RoPE leaves q/k in fp32 while v is bf16: the kernel runs all three in bf16, as SDPA
    does, and hands back gradients in each input's dtype."""
    q, k, v = (x.detach().float().requires_grad_() for x in qkv())
    v_low = v.detach().bfloat16().requires_grad_()
    outs = {}
    for backend in ("sdpa", "math"):
        with torch.autocast("cpu", dtype=torch.bfloat16), force_attention_backend(backend):
            out = sdpa_attention(q, k, v_low, None)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v_low))
        assert out.dtype == torch.bfloat16
        assert [g.dtype for g in grads] == [torch.float32, torch.float32, torch.bfloat16]
        outs[backend] = [out, *grads]
    for a, b in zip(outs["math"], outs["sdpa"], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=0.05, rtol=0.05)


def test_automatic_dispatch_rules():
    def applies(dtype=torch.bfloat16, qk_dim=16, v_dim=16, length=12, past=0, batch=2, dropout=0.0):
        q, k, v = qkv(qk_dim=qk_dim, v_dim=v_dim, batch=batch, length=length + past, dtype=torch.float32)
        return math_attention_applies(q[:, :, past:], k, v, dtype, dropout)

    assert applies()  # CPU bf16, no past
    assert applies(torch.float16)
    assert not applies(torch.float32)  # SDPA's fused fp32 kernel is as fast
    assert applies(torch.float32, qk_dim=24, v_dim=16)  # MLA dims: SDPA would run its composite math path
    assert not applies(past=3)  # decoding with a cache
    assert not applies(length=1)
    assert not applies(dropout=0.1)
    assert applies(length=math_attention.MATH_MAX_LEN) and not applies(length=math_attention.MATH_MAX_LEN + 1)
    longest = math_attention.MATH_MAX_LEN_UNFUSED  # MLA dims in bf16: SDPA has no fused kernel to fall back on
    assert applies(qk_dim=24, v_dim=16, length=longest) and not applies(qk_dim=24, v_dim=16, length=longest + 1)
    assert not applies(torch.float32, qk_dim=24, v_dim=16, length=math_attention.MATH_MAX_LEN + 1)
    assert not applies(length=256, batch=2 * math_attention.MATH_MAX_SCORES // (4 * 256 * 256))  # too many scores

    q, k, v = (x.to("meta") for x in qkv(dtype=torch.bfloat16))
    assert not math_attention_applies(q, k, v, torch.bfloat16)  # not a CPU tensor


def test_forced_backends():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert dense_backend(q, k, v) == "math"
    with force_attention_backend("sdpa"):
        assert dense_backend(q, k, v) == "sdpa"
    assert dense_backend(q, k, v, caller_mask=True) == "sdpa"  # a caller's 4-D mask may block whole rows
    blocked = torch.ones(1, 1, 12, 12, dtype=torch.bool)
    blocked[..., 3, :] = False  # query 3 may see nothing: SDPA gives zeros there, the math kernel would give NaN
    out = sdpa_attention(q, k, v, blocked)
    assert torch.isfinite(out).all()
    q32, k32, v32 = qkv(dtype=torch.float32)
    assert dense_backend(q32, k32, v32) == "sdpa"
    with force_attention_backend("math"):
        assert dense_backend(q32, k32, v32) == "math"
        assert dense_backend(q32[:, :, -1:], k32, v32) == "sdpa"  # one query against a cache: SDPA
        with pytest.raises(UserError, match="no attention dropout"):
            dense_backend(q32, k32, v32, dropout_p=0.1)
    with pytest.raises(ValueError, match="as many queries as keys"):
        math_attention.math_attention(q[:, :, -1:], k, v)
    with pytest.raises(ValueError, match="boolean mask"):
        math_attention.math_attention(q, k, v, mask=torch.zeros(1, 1, 12, 12))


def test_bf16_llama_training_step_takes_the_kernel_and_matches_sdpa(monkeypatch):
    calls = []
    real = attention.math_attention
    monkeypatch.setattr(attention, "math_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = build_model("mini_llama3", "tiny", vocab_size=256, num_hidden_layers=2)
    ids = random_ids(256, 2, 32)
    pos = torch.tensor([list(range(32)), list(range(20)) + list(range(12))])  # row 1 packs two documents
    results = {}
    for backend in (None, "sdpa"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), force_attention_backend(backend):
            loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert len(calls) == 2  # the automatic choice: both layers, the SDPA run none
    (loss_math, grads_math), (loss_sdpa, grads_sdpa) = results[None], results["sdpa"]
    assert torch.allclose(loss_math, loss_sdpa, atol=2e-2), (loss_math, loss_sdpa)
    cosine = [F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) for a, b in
              zip(grads_math, grads_sdpa, strict=True)]
    assert min(cosine) > 0.99, min(cosine)


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_compiled_layers_train_in_bf16_on_a_cpu(name, monkeypatch):
    """`--compile` in bf16 on a CPU: the compiled layers run the math kernel and give eager's loss and gradients.
    (The kernel's one-pass scaling into a fresh contiguous tensor, `mul(out=...)`, became a plain `mul` keeping q's
    transposed layout under the compiler, and its `view` failed at mini_llama3's first step.) AOTAutograd's eager
    backend traces forward and backward as the default backend does, without generating code."""
    calls = []
    real = math_attention._MathAttention.apply
    monkeypatch.setattr(math_attention._MathAttention, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    layers = {"layer_types": ["linear_attention", "full_attention"]} if name == "mini_qwen3_next" else {}
    model = build_model(name, "tiny", vocab_size=256, num_hidden_layers=2, **layers)
    ids = random_ids(256, 2, 32)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = step()
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.compile(backend="aot_eager")
    loss, grads = step()
    torch._dynamo.reset()
    assert calls  # the kernel ran
    assert torch.allclose(loss, eager_loss, atol=1e-2), (loss, eager_loss)
    cosine = [F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) for a, b in
              zip(grads, eager_grads, strict=True)]
    assert min(cosine) > 0.99, min(cosine)
