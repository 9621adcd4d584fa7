"""The optional GPU kernel dispatch of Gated DeltaNet (minillm/models/mini_qwen3_next/fla_kernels.py).

fla and causal-conv1d need CUDA and Triton, so these tests install stand-in modules under the real import names
(`fla.ops.gated_delta_rule`, `causal_conv1d`) that implement the packages' signatures and layouts ((B, T, H, D),
`cu_seqlens` with B = 1 for packed rows, per-sequence initial states, `seq_idx` for the conv) with a plain
token-by-token reference written here, then widen the dispatch condition to CPU/fp32. Equal outputs and gradients
against the torch path prove our layout conversions and argument passing; the stand-ins also refuse the inputs the
real kernels refuse (q/k with fewer heads than v, varlen with B > 1, a non-channels-last x with seq_idx)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from device_reads import EmulatedDevice
from transformers import DynamicCache

from minillm.models.mini_qwen3_next import MiniQwen3NextConfig, MiniQwen3NextForCausalLM, fla_kernels
from minillm.models.mini_qwen3_next.gated_deltanet import GatedDeltaNet, causal_conv1d, chunk_gated_delta_rule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for the packages, in their layouts
# ----------------------------------------------------------------------------------------------------------------


def _naive_rule(q, k, v, g, beta, scale, h0, l2norm):
    """One sequence, fla layout: q, k (T, H, K), v (T, H, V), g, beta (T, H), h0 (H, K, V) -> (T, H, V), state."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if l2norm:  # fla's l2norm: x * rsqrt(sum(x^2) + 1e-6)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    S = h0.float() if h0 is not None else q.new_zeros(q.shape[1], q.shape[2], v.shape[2])
    out = []
    for t in range(q.shape[0]):
        S = S * g[t].exp()[:, None, None]
        error = v[t] - torch.einsum("hk,hkv->hv", k[t], S)
        S = S + k[t][:, :, None] * (beta[t][:, None] * error)[:, None, :]
        out.append(torch.einsum("hk,hkv->hv", q[t] * scale, S))
    return torch.stack(out), S


class FakeFla(types.ModuleType):
    """`fla.ops.gated_delta_rule` with the two kernels we call; records every call."""

    def __init__(self):
        super().__init__("fla.ops.gated_delta_rule")
        self.calls = []
        self.chunk_gated_delta_rule = self._kernel("chunk")
        self.fused_recurrent_gated_delta_rule = self._kernel("recurrent")

    def _kernel(self, name):
        def kernel(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
            assert not kwargs, f"unexpected arguments {sorted(kwargs)}"
            assert q.shape == k.shape and q.shape[:3] == v.shape[:3], "q, k, v must be (B, T, H, *) with equal H"
            assert g.shape == beta.shape == v.shape[:3] and g.dtype == torch.float32
            B, T, H, K = q.shape
            scale = K**-0.5 if scale is None else scale
            self.calls.append(dict(kernel=name, cu_seqlens=None if cu_seqlens is None else cu_seqlens.tolist(),
                                   initial_state=initial_state, l2norm=use_qk_l2norm_in_kernel, scale=scale,
                                   final_state=output_final_state))
            if cu_seqlens is None:
                spans = [(b, 0, T) for b in range(B)]
            else:
                assert B == 1 and cu_seqlens.dtype == torch.long, "varlen takes one flattened row"
                bounds = cu_seqlens.tolist()
                spans = [(0, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            if initial_state is not None:
                assert initial_state.shape == (len(spans), H, K, v.shape[-1])
            outs, states = [], []
            for n, (b, lo, hi) in enumerate(spans):
                h0 = None if initial_state is None else initial_state[n]
                o, s = _naive_rule(q[b, lo:hi], k[b, lo:hi], v[b, lo:hi], g[b, lo:hi], beta[b, lo:hi], scale, h0,
                                   use_qk_l2norm_in_kernel)
                outs.append(o)
                states.append(s)
            o = torch.cat(outs).reshape(B, T, H, -1) if cu_seqlens is not None else torch.stack(outs)
            return o.to(q.dtype), (torch.stack(states) if output_final_state else None)

        return kernel


class FakeCausalConv1d(types.ModuleType):
    """`causal_conv1d` with `causal_conv1d_fn(x (B, D, L), weight (D, K), bias, seq_idx, activation)`."""

    def __init__(self):
        super().__init__("causal_conv1d")
        self.calls = []

    def causal_conv1d_fn(self, x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        B, D, L = x.shape
        K = weight.shape[-1]
        if seq_idx is not None:
            assert x.stride(1) == 1, "seq_idx needs a channels-last x"
            assert seq_idx.shape == (B, L) and seq_idx.dtype == torch.int32
        self.calls.append(dict(seq_idx=seq_idx))
        out = x * weight[:, K - 1, None]
        for i in range(1, K):
            tap = F.pad(x, (i, 0))[..., :L] * weight[:, K - 1 - i, None]
            if seq_idx is not None:
                same = F.pad(seq_idx, (i, 0), value=-1)[:, :L] == seq_idx  # (B, L)
                tap = tap * same[:, None, :]
            out = out + tap
        if bias is not None:
            out = out + bias[:, None]
        return F.silu(out) if activation in ("silu", "swish") else out


@pytest.fixture
def kernels(monkeypatch):
    """Install both stand-ins and let the dispatch take them on CPU in fp32."""
    fla, conv = FakeFla(), FakeCausalConv1d()
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fla)
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv)
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_kernels, "KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(fla_kernels, "fla_works", lambda *key: True)  # the probe's own calls would be logged too
    fla_kernels.clear_cache()
    yield fla, conv
    fla_kernels.clear_cache()


def _torch_path(fn):
    """Run `fn` with the kernels switched off (the torch fallback)."""
    saved = fla_kernels.KERNEL_DEVICE_TYPES
    fla_kernels.KERNEL_DEVICE_TYPES = ()
    try:
        return fn()
    finally:
        fla_kernels.KERNEL_DEVICE_TYPES = saved


def _inputs(B=2, L=21, Hk=2, H=4, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, L, Hk, D, generator=gen), torch.randn(B, L, Hk, D, generator=gen)
    v = torch.randn(B, L, H, D, generator=gen)
    g = -torch.rand(B, L, H, generator=gen) * 0.7
    beta = torch.rand(B, L, H, generator=gen)
    return q, k, v, g, beta


def _layer(seed=0):
    config = MiniQwen3NextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=2,
        num_key_value_heads=1, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_chunk_size=4, num_experts=0,
    )
    torch.manual_seed(seed)
    layer = GatedDeltaNet(config, layer_idx=0)
    with torch.no_grad():
        for p in (layer.in_proj_qkvz.weight, layer.in_proj_ba.weight, layer.out_proj.weight):
            p.normal_(0, 0.3)
    return config, layer


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_without_the_packages_or_off_cuda_the_torch_path_runs(monkeypatch):
    q = torch.randn(1, 3, 2, 8)
    fla_kernels.clear_cache()
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", None)  # import fails: not installed
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_kernels, "KERNEL_DTYPES", (torch.float32,))
    assert fla_kernels.fla_ops() is None and not fla_kernels.fla_applies(q)
    assert not fla_kernels.conv_applies(q[:, :, 0], None)
    fla_kernels.clear_cache()
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", FakeFla())
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cuda",))  # the real condition: CPU tensors never
    assert fla_kernels.fla_ops() is not None and not fla_kernels.fla_applies(q)
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_kernels, "KERNEL_DTYPES", (torch.bfloat16, torch.float16))  # fp32 stays on torch
    assert not fla_kernels.fla_applies(q) and fla_kernels.fla_applies(q.bfloat16())
    fla_kernels.clear_cache()


def test_rule_matches_torch_with_states_and_packed_documents(kernels):
    """Direct calls: plain batch, an initial state, packed rows (one row opening with a document start, the other
    continuing its state into its first document), and the recurrent kernel."""
    fla, _ = kernels
    q, k, v, g, beta = _inputs()
    state = torch.randn(2, 4, 8, 8) * 0.3
    starts = torch.zeros(2, 21, dtype=torch.bool)
    starts[0, [0, 5, 13]] = True
    starts[1, [9]] = True
    for init, docs in ((None, None), (state, None), (None, starts), (state, starts)):
        o, s = fla_kernels.gated_delta_rule(q, k, v, g, beta, init, docs)
        o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, init, docs, chunk_size=4)
        assert (o - o_ref).abs().max() <= 1e-5 and (s - s_ref).abs().max() <= 1e-5
    call = fla.calls[-1]
    assert call["kernel"] == "chunk" and call["l2norm"] and call["scale"] == 8**-0.5
    assert call["cu_seqlens"] == [0, 5, 13, 21, 30, 42]  # row 1 starts a sequence at flat 21, its document at 30
    assert call["initial_state"].shape == (5, 4, 8, 8)
    assert call["initial_state"][0].abs().max() == 0  # row 0 opens with a document start: no carried state
    assert torch.equal(call["initial_state"][3], state[1])  # row 1's first sequence continues its state
    o, s = fla_kernels.gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], state, recurrent=True)
    o_ref, s_ref = chunk_gated_delta_rule(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], state)
    assert fla.calls[-1]["kernel"] == "recurrent"
    assert (o - o_ref).abs().max() <= 1e-5 and (s - s_ref).abs().max() <= 1e-5


def test_conv_kernel_matches_torch_conv(kernels):
    _, conv = kernels
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 12, 6, generator=gen), torch.randn(6, 4, generator=gen)
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[0, [3, 4, 10]] = True  # row 0: tokens 0-2 precede any start (their own segment)
    starts[1, [0, 7]] = True
    for docs in (None, starts):
        out, state = causal_conv1d(x, w, doc_starts=docs)
        out_ref, state_ref = _torch_path(lambda docs=docs: causal_conv1d(x, w, doc_starts=docs))
        assert (out - out_ref).abs().max() <= 1e-6 and torch.equal(state, state_ref)
    assert len(conv.calls) == 2 and conv.calls[1]["seq_idx"][0].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    # A carried-in window (cache continuation) stays on the torch path.
    causal_conv1d(x[:, 4:], w, prev=x[:, :4])
    assert len(conv.calls) == 2


def test_layer_forward_and_gradients_match_torch(kernels):
    fla, conv = kernels
    _, layer = _layer()
    x = torch.randn(2, 11, 32)
    starts = torch.zeros(2, 11, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 6] = True
    for docs in (None, starts):
        fla.calls.clear()
        results = []
        for run in (lambda docs=docs: layer(x, doc_starts=docs), lambda docs=docs: _torch_path(lambda: layer(x, doc_starts=docs))):
            layer.zero_grad()
            out = run()
            out.pow(2).sum().backward()
            results.append([out.detach()] + [p.grad.clone() for p in layer.parameters()])
        for a, b in zip(*results, strict=True):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
        assert [(c["kernel"], c["final_state"]) for c in fla.calls] == [("chunk", False)]  # training: no state
    assert len(conv.calls) == 2


@torch.no_grad()
def test_layer_cache_prefill_and_decode_match_torch(kernels):
    fla, _ = kernels
    config, layer = _layer(seed=1)
    x = torch.randn(2, 10, 32)

    def run():
        cache = DynamicCache(config=config)
        out = [layer(x[:, :7], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(7, 10)]
        return torch.cat(out, dim=1), cache.layers[0].recurrent_states[0]

    out, state = run()
    out_ref, state_ref = _torch_path(run)
    assert [c["kernel"] for c in fla.calls] == ["chunk"] + ["recurrent"] * 3
    assert (out - out_ref).abs().max() <= 1e-5 and (state - state_ref).abs().max() <= 1e-5


@torch.no_grad()
def test_model_with_packed_documents_matches_torch(kernels):
    fla, conv = kernels
    config = MiniQwen3NextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_chunk_size=4, num_experts=0,
    )
    torch.manual_seed(0)
    model = MiniQwen3NextForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 15))
    position_ids = torch.cat([torch.arange(6), torch.arange(9)])[None].expand(2, -1)
    logits = model(input_ids=ids, position_ids=position_ids).logits
    logits_ref = _torch_path(lambda: model(input_ids=ids, position_ids=position_ids).logits)
    assert (logits - logits_ref).abs().max() <= 1e-5
    assert fla.calls[0]["cu_seqlens"] == [0, 6, 15, 21, 30] and conv.calls[0]["seq_idx"] is not None


def _deltanet_model(layers: int) -> MiniQwen3NextForCausalLM:
    """A tiny mini_qwen3_next of Gated DeltaNet layers only, no experts, vocabulary 128."""
    config = MiniQwen3NextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        layer_types=["linear_attention"] * layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_chunk_size=4, num_experts=0,
    )
    torch.manual_seed(0)
    return MiniQwen3NextForCausalLM(config)


def test_packed_documents_are_flattened_once_per_forward(kernels, monkeypatch):
    """Every Gated DeltaNet layer of a forward gets the same document starts: their flattened sequences (a
    `nonzero`, a wait for the device on a GPU) are found once, not once per layer; new starts are found again."""
    fla, _ = kernels
    model = _deltanet_model(layers=3)
    found = []
    real = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **kw: found.append(1) or real(t, *a, **kw))
    ids = torch.randint(0, 128, (2, 15))
    for split in (6, 9):
        position_ids = torch.cat([torch.arange(split), torch.arange(15 - split)])[None].expand(2, -1)
        found.clear()
        fla.calls.clear()
        model(input_ids=ids, position_ids=position_ids)
        assert len(fla.calls) == 3 and len(found) == 1, (len(fla.calls), len(found))
        assert fla.calls[-1]["cu_seqlens"] == [0, split, 15, 15 + split, 30]


def test_a_trainer_batch_reaches_the_kernels_without_a_read_back(kernels, monkeypatch):
    """A packed batch that the trainer moved to the device (its host tensors kept as host copies), forward and
    backward through fla and causal-conv1d, with the device emulated on the CPU: the flattened sequences are found
    on the host, nothing is read back. (A batch made on the device is read once per forward, test above.)"""
    fla, conv = kernels
    model = _deltanet_model(layers=2)
    ids = torch.randint(0, 128, (2, 15))
    position_ids = torch.cat([torch.arange(6), torch.arange(9)])[None].expand(2, -1).contiguous()
    with EmulatedDevice(monkeypatch, model) as device:
        monkeypatch.setattr(fla, "chunk_gated_delta_rule", device.as_kernel(fla.chunk_gated_delta_rule))
        monkeypatch.setattr(conv, "causal_conv1d_fn", device.as_kernel(conv.causal_conv1d_fn))
        batch = {"input_ids": device.move(ids), "labels": device.move(ids), "position_ids": device.move(position_ids)}
        model(**batch).loss.backward()
    assert len(fla.calls) == 2 and fla.calls[-1]["cu_seqlens"] == [0, 6, 15, 21, 30]
    assert device.reads == []


def test_compiled_layers_flatten_packed_documents_once_per_forward(kernels, monkeypatch):
    """With each decoder layer compiled (`--compile`), the flattened sequences are still found once per forward,
    eagerly: traced into each layer's graph they would be found again in every layer, on the device (the memo and
    the batch's host copy are out of a compiled graph's reach)."""
    model = _deltanet_model(layers=2)
    for layer in model.model.layers:
        layer.compile(backend="eager")
    found = []
    real = fla_kernels._find_sequences
    monkeypatch.setattr(fla_kernels, "_find_sequences", lambda starts: found.append(1) or real(starts))
    ids = torch.randint(0, 128, (2, 15))
    position_ids = torch.cat([torch.arange(6), torch.arange(9)])[None].expand(2, -1)
    try:
        model(input_ids=ids, labels=ids, position_ids=position_ids).loss.backward()
    finally:
        torch._dynamo.reset()
    assert len(found) == 1


def test_a_kernel_that_fails_or_computes_wrong_is_probed_once_and_left_for_the_torch_path(monkeypatch):
    """`fla_works` runs fla once per configuration against the torch rule: a stand-in that raises in its backward
    (as fla 0.6 does on Hopper with Triton < 3.7.1) or returns wrong values is refused with a warning, and the layer
    then gives the torch path's results; a correct one is taken."""
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(fla_kernels, "KERNEL_DTYPES", (torch.float32,))
    _, layer = _layer()
    x = torch.randn(2, 11, 32)
    want = _torch_path(lambda: layer(x))

    class RaisesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, o):
            return o.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")

    correct = FakeFla()
    chunk = correct.chunk_gated_delta_rule
    failing, wrong = FakeFla(), FakeFla()
    failing.chunk_gated_delta_rule = lambda *a, **kw: (RaisesInBackward.apply(chunk(*a, **kw)[0]), None)
    wrong.chunk_gated_delta_rule = lambda *a, **kw: (chunk(*a, **kw)[0] * 1.5, None)
    for fake, works in ((failing, False), (wrong, False), (correct, True)):
        monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", fake)
        fla_kernels.clear_cache()
        if works:
            assert fla_kernels.fla_applies(x.view(2, 11, 4, 8))
        else:
            with pytest.warns(UserWarning, match="uses the torch implementation instead"):
                assert not fla_kernels.fla_applies(x.view(2, 11, 4, 8))
            assert (layer(x) - want).abs().max() <= 1e-5  # no second probe, no second warning
        assert list(fla_kernels._FLA_PROBES.values()) == [works]
    fla_kernels.clear_cache()
