"""Gated DeltaNet (minillm/models/mini_qwen3_next/gated_deltanet.py): the chunked form equals the token-by-token
recurrence (outputs, final states and gradients), documents packed in a row never see each other's state, and the
layer's cache (conv window + recurrent state) continues a sequence exactly."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.qwen3_next import modeling_qwen3_next as reference

from minillm.models.mini_qwen3_next import MiniQwen3NextConfig
from minillm.models.mini_qwen3_next.gated_deltanet import (
    GatedDeltaNet,
    causal_conv1d,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _inputs(B=2, L=45, Hk=2, H=4, Dk=8, Dv=12, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hk, Dk, generator=gen)
    k = torch.randn(B, L, Hk, Dk, generator=gen)
    v = torch.randn(B, L, H, Dv, generator=gen)
    g = -torch.rand(B, L, H, generator=gen) * 0.7  # log decay <= 0
    beta = torch.rand(B, L, H, generator=gen)
    tensors = [q, k, v, g, beta]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


def _starts(B, L, positions):
    starts = torch.zeros(B, L, dtype=torch.bool)
    for row, cols in enumerate(positions):
        starts[row, cols] = True
    return starts


def test_chunked_equals_recurrent_with_initial_state():
    q, k, v, g, beta = _inputs()
    state = torch.randn(2, 4, 8, 12) * 0.3
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    for chunk in (4, 16, 64):  # several chunks + ragged tail, and a single partial chunk
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=chunk)
        assert o.shape == (2, 45, 4, 12) and s.shape == (2, 4, 8, 12)
        assert (o - o_rec).abs().max() <= 1e-5
        assert (s - s_rec).abs().max() <= 1e-5


def test_matches_transformers_reference_kernels():
    q, k, v, g, beta = _inputs(L=70)
    state = torch.randn(2, 4, 8, 12) * 0.3
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    o_ref, s_ref = reference.torch_chunk_gated_delta_rule(
        q,
        k,
        v,
        g,
        beta,
        chunk_size=64,
        initial_state=state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    assert (o - o_ref).abs().max() <= 1e-5
    assert (s - s_ref).abs().max() <= 1e-5


def test_chunked_gradients_equal_recurrent_gradients():
    inputs = _inputs(L=21, requires_grad=True)
    weights = torch.randn(2, 21, 4, 12)
    grads = []
    for fn in (recurrent_gated_delta_rule, lambda *a: chunk_gated_delta_rule(*a, chunk_size=8)):
        o, s = fn(*inputs)
        ((o * weights).sum() + s.square().sum()).backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for name, a, b in zip("q k v g beta".split(), *grads, strict=True):
        assert (a - b).abs().max() <= 1e-4, name


def test_document_starts_reset_the_state():
    B, L = 2, 45
    q, k, v, g, beta = _inputs(B, L)
    state = torch.randn(B, 4, 8, 12)
    # Row 0: documents at 0, 5, 16 (a chunk boundary), 17, 30; row 1: continues `state`, new document at 20.
    starts = _starts(B, L, [[0, 5, 16, 17, 30], [20]])
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, state, starts)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state, starts, chunk_size=8)
    assert (o - o_rec).abs().max() <= 1e-5 and (s - s_rec).abs().max() <= 1e-5
    # Each document equals itself run alone from a zero state; row 1's first part continues the initial state.
    for row, bounds in ((0, [0, 5, 16, 17, 30, L]), (1, [20, L])):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            alone, alone_state = chunk_gated_delta_rule(
                *(t[row : row + 1, lo:hi] for t in (q, k, v, g, beta)), chunk_size=8
            )
            assert (o[row : row + 1, lo:hi] - alone).abs().max() <= 1e-5, (row, lo, hi)
        assert (s[row] - alone_state[0]).abs().max() <= 1e-5  # the final state is the last document's
    head, _ = chunk_gated_delta_rule(*(t[1:, :20] for t in (q, k, v, g, beta)), state[1:], chunk_size=8)
    assert (o[1:, :20] - head).abs().max() <= 1e-5


def test_causal_conv_matches_conv1d_and_continues_from_its_state():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 6, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    out, state = causal_conv1d(x, w)
    expected = reference.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    assert (out - expected).abs().max() <= 1e-6
    assert torch.equal(state, x[:, -4:])
    # Split anywhere (including a 1-token step and a piece shorter than the kernel): same outputs.
    out_a, state_a = causal_conv1d(x[:, :2], w)
    out_b, state_b = causal_conv1d(x[:, 2:3], w, state_a)
    out_c, _ = causal_conv1d(x[:, 3:], w, state_b)
    assert (torch.cat([out_a, out_b, out_c], dim=1) - out).abs().max() <= 1e-6


def test_causal_conv_never_crosses_a_document_start():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, 5, generator=gen)
    w = torch.randn(5, 4, generator=gen)
    starts = _starts(1, 12, [[0, 3, 4, 10]])
    out, state = causal_conv1d(x, w, doc_starts=starts)
    for lo, hi in ((0, 3), (3, 4), (4, 10), (10, 12)):
        alone, _ = causal_conv1d(x[:, lo:hi], w)
        assert (out[:, lo:hi] - alone).abs().max() <= 1e-6
    # The state keeps only the last document's inputs, so a continuation cannot read the earlier ones.
    assert torch.equal(state[:, :2], torch.zeros(1, 2, 5)) and torch.equal(state[:, 2:], x[:, 10:])


def _layer(seed=0):
    config = MiniQwen3NextConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_chunk_size=4,
        num_experts=0,
    )
    torch.manual_seed(seed)
    layer = GatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in (layer.in_proj_qkvz.weight, layer.in_proj_ba.weight, layer.out_proj.weight):
            p.normal_(0, 0.3)
    return config, layer


@torch.no_grad()
def test_layer_cache_continuation_equals_full_sequence():
    """Prefill 9 tokens into a transformers DynamicCache, then decode 6 one at a time == one full forward."""
    config, layer = _layer()
    x = torch.randn(2, 15, 32)
    full = layer(x)
    cache = DynamicCache(config=config)
    pieces = [layer(x[:, :9], cache=cache)]
    conv_state, recurrent_state = cache.layers[0].conv_states[0], cache.layers[0].recurrent_states[0]
    assert conv_state.shape == (2, layer.conv_dim, 4) and recurrent_state.shape == (2, 4, 8, 8)
    for t in range(9, 15):
        pieces.append(layer(x[:, t : t + 1], cache=cache))
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_layer_packed_prefill_then_decode_stays_in_the_last_document():
    """A packed prefill whose last document starts 2 tokens before the end: decoding continues only that document
    (neither the recurrent state nor the conv window may carry the previous documents)."""
    config, layer = _layer(seed=1)
    x = torch.randn(1, 14, 32)
    starts = _starts(1, 10, [[0, 4, 8]])
    cache = DynamicCache(config=config)
    packed = layer(x[:, :10], doc_starts=starts, cache=cache)
    steps = [layer(x[:, t : t + 1], cache=cache) for t in range(10, 14)]
    alone = layer(x[:, 8:14])
    assert (packed[:, 8:10] - alone[:, :2]).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1) - alone[:, 2:]).abs().max() <= 1e-5
    first = layer(x[:, :4])
    assert (packed[:, :4] - first).abs().max() <= 1e-5


@torch.no_grad()
def test_layer_left_padding_writes_nothing_to_the_state():
    config, layer = _layer(seed=2)
    x = torch.randn(1, 7, 32)
    padded = torch.cat([torch.randn(1, 3, 32) * 5, x], dim=1)  # garbage in the padding slots
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    cache_a, cache_b = DynamicCache(config=config), DynamicCache(config=config)
    out_padded = layer(padded, attention_mask=mask, cache=cache_a)[:, 3:]
    out_alone = layer(x, cache=cache_b)
    assert (out_padded - out_alone).abs().max() <= 1e-5
    assert (cache_a.layers[0].recurrent_states[0] - cache_b.layers[0].recurrent_states[0]).abs().max() <= 1e-5
    nxt = torch.randn(1, 1, 32)
    assert (layer(nxt, cache=cache_a) - layer(nxt, cache=cache_b)).abs().max() <= 1e-5


def test_l2norm_and_decay_are_computed_in_fp32_under_bf16_inputs():
    q, k, v, g, beta = (t.bfloat16() for t in _inputs(L=10))
    o, s = chunk_gated_delta_rule(q, k, v, g.float(), beta, chunk_size=4)
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g.float(), beta)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert F.mse_loss(o.float(), o_rec.float()) <= 1e-4
