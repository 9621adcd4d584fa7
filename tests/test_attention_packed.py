"""Packed-document attention paths (minillm/models/layers/attention.py): the document boundaries derived once per
forward, the dispatch rules, and the flex_attention and flash-attn varlen paths against the dense block-mask SDPA
path they replace on CUDA.

No CUDA here: flex_attention runs forward-only on CPU (forced, no_grad); flash-attn is a stand-in module in
`sys.modules` whose `flash_attn_varlen_func` has flash-attn 2's signature and checks its contract (unpadded
(T, heads, dim) layout, int32 cu_seqlens, equal head dims) and computes each document with SDPA. Equal outputs
prove our argument preparation (unpadding, cu_seqlens, layout, softmax scale, GQA, MLA head-dim padding).
"""

import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from device_reads import EmulatedDevice
from model_checks import compiled_layer_graphs, random_ids

import minillm  # noqa: F401  (registers the Auto classes)
from minillm.errors import UserError
from minillm.models.layers import attention
from minillm.models.layers.attention import (
    PackedDocs,
    build_attention_mask,
    force_attention_backend,
    packed_backend,
    prepare_attention,
    sdpa_attention,
    varlen_index,
)
from minillm.models.registry import build_model

VOCAB = 256


def docs_for(position_ids, attention_mask=None) -> PackedDocs:
    batch = max(position_ids.shape[0], 1 if attention_mask is None else attention_mask.shape[0])
    out = prepare_attention(position_ids.shape[1], position_ids.shape[1], attention_mask, position_ids, None, batch)
    assert isinstance(out, PackedDocs)
    return out


# ---------------------------------------------------------------- document boundaries


def test_varlen_index_of_one_packed_row():
    index = docs_for(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])).varlen()
    assert index.cu_seqlens.dtype == torch.int32
    assert index.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert index.max_seqlen == 4
    assert index.token_index is None  # no padding: nothing to gather


def test_varlen_index_of_several_rows_and_row_ends():
    # Both rows are each one document with the same id: the row end still cuts them.
    index = varlen_index(torch.ones(2, 4, dtype=torch.long))
    assert index.cu_seqlens.tolist() == [0, 4, 8]
    index = docs_for(torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]])).varlen()
    assert index.cu_seqlens.tolist() == [0, 2, 5, 9, 10]
    assert index.max_seqlen == 4
    # A continuation chunk (row not starting at 0) keeps its first tokens as a document of their own.
    index = docs_for(torch.tensor([[5, 6, 0, 1]])).varlen()
    assert index.cu_seqlens.tolist() == [0, 2, 4]


def test_varlen_index_drops_padding():
    # Right padding (pad positions continue), one packed row and one padded row.
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    index = docs_for(pos, mask).varlen()
    assert index.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert index.token_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert index.max_seqlen == 3
    # Left padding with positions from cumsum(mask) - 1 clamped at 0 (pads all at position 0).
    index = docs_for(torch.tensor([[0, 0, 0, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1]])).varlen()
    assert index.token_index.tolist() == [2, 3, 4]
    assert index.cu_seqlens.tolist() == [0, 3]
    # A row of pure padding contributes no document.
    index = docs_for(torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[1, 1, 0], [0, 0, 0]])).varlen()
    assert index.cu_seqlens.tolist() == [0, 2]


def test_prepare_attention_returns_packed_docs_only_without_past():
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert prepare_attention(6, 6, None, torch.arange(6)[None]) is None  # one document: plain causal
    docs = prepare_attention(6, 6, None, packed)
    assert isinstance(docs, PackedDocs)
    assert torch.equal(docs.dense_mask(), build_attention_mask(6, 6, None, packed))
    assert docs.dense_mask() is docs.dense_mask()  # built once, shared by all layers
    padded = prepare_attention(4, 4, torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 2]]))
    assert isinstance(padded, PackedDocs)
    # With a cache (decoding), the dense end-aligned mask as before.
    with_cache = prepare_attention(1, 5, torch.tensor([[0, 1, 1, 1, 1]]), torch.tensor([[3]]))
    assert isinstance(with_cache, torch.Tensor) and with_cache.shape == (1, 1, 1, 5)
    with pytest.raises(ValueError, match="attention_mask covers"):
        prepare_attention(4, 4, torch.tensor([[0, 1, 1]]), torch.arange(4)[None])


# ---------------------------------------------------------------- dispatch rules


def fake(device_cuda: bool, dtype: torch.dtype, dim: int = 64) -> SimpleNamespace:
    """What `packed_backend` reads of a tensor: device kind, dtype and head dim."""
    return SimpleNamespace(is_cuda=device_cuda, dtype=dtype, shape=(2, 4, 16, dim))


def install_flash(monkeypatch, varlen_fn, module="flash_attn"):
    """Put a stand-in flash-attn module in sys.modules (and hide the other version)."""
    other = "flash_attn_interface" if module == "flash_attn" else "flash_attn"
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(flash_attn_varlen_func=varlen_fn))
    monkeypatch.setitem(sys.modules, other, None)  # None in sys.modules: import raises ImportError
    attention.flash_varlen_function.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_flash_lookup(monkeypatch):
    monkeypatch.delenv("MINILLM_ATTENTION_BACKEND", raising=False)
    attention.flash_varlen_function.cache_clear()
    yield
    attention.flash_varlen_function.cache_clear()


def test_dispatch_rules(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    attention.flash_varlen_function.cache_clear()
    assert packed_backend(fake(False, torch.bfloat16), fake(False, torch.bfloat16)) == "sdpa"  # CPU
    assert packed_backend(fake(True, torch.bfloat16), fake(True, torch.bfloat16)) == "flex"  # no flash-attn
    assert packed_backend(fake(True, torch.float32), fake(True, torch.float32), dropout_p=0.1) == "sdpa"
    assert packed_backend(fake(True, torch.float32), fake(True, torch.float32)) == "sdpa"  # flex: half precision
    # flex with GQA only at multiples of its 128-token block (the fake rows hold 16 tokens); without GQA at any length
    assert packed_backend(fake(True, torch.bfloat16), fake(True, torch.bfloat16), kv_heads=2) == "sdpa"
    assert packed_backend(fake(True, torch.bfloat16), fake(True, torch.bfloat16), kv_heads=4) == "flex"
    rows_of_128 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 4, 128, 64))
    assert packed_backend(rows_of_128, rows_of_128, kv_heads=2) == "flex"

    install_flash(monkeypatch, lambda *a, **k: None, module="flash_attn")
    bf16, fp32 = fake(True, torch.bfloat16), fake(True, torch.float32)
    assert packed_backend(bf16, bf16) == "flash"
    assert packed_backend(fake(True, torch.float16), fake(True, torch.float16)) == "flash"
    assert packed_backend(fp32, fp32) == "sdpa"  # flash-attn has no fp32 kernels, flex none that compiled (H200)
    assert packed_backend(bf16, bf16, dropout_p=0.1) == "flash"  # flash-attn 2 has dropout
    assert packed_backend(fake(True, torch.bfloat16, 320), fake(True, torch.bfloat16, 320)) == "flex"  # > 256
    assert packed_backend(fake(False, torch.bfloat16), fake(False, torch.bfloat16)) == "sdpa"

    install_flash(monkeypatch, lambda *a, **k: None, module="flash_attn_interface")  # flash-attn 3: no dropout
    assert packed_backend(bf16, bf16) == "flash"
    assert packed_backend(bf16, bf16, dropout_p=0.1) == "sdpa"

    # Mixed precision (fp32 weights, CUDA autocast to bf16): RoPE leaves q in fp32, yet attention runs in bf16.
    with monkeypatch.context() as m:
        m.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
        m.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
        assert packed_backend(fp32, bf16) == "flash"

    with force_attention_backend("flex"):
        assert packed_backend(fake(False, torch.float32), fake(False, torch.float32)) == "flex"
    monkeypatch.setenv("MINILLM_ATTENTION_BACKEND", "sdpa")
    assert packed_backend(bf16, bf16) == "sdpa"
    monkeypatch.setenv("MINILLM_ATTENTION_BACKEND", "xformers")
    with pytest.raises(UserError, match="known backends"):  # a user's setting: one line, no traceback
        packed_backend(bf16, bf16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        with force_attention_backend("xformers"):
            pass


# ---------------------------------------------------------------- the paths against block-mask SDPA


def packed_inputs(qk_dim=16, v_dim=16, heads=6, kv_heads=2, seed=0):
    """Row 0 packs 3 documents (5 + 7 + 8 tokens); row 1 packs 2 documents (6 + 9) then 5 tokens of padding."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.tensor([list(range(5)) + list(range(7)) + list(range(8)), list(range(6)) + list(range(14))])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    q = torch.randn(2, heads, 20, qk_dim, generator=gen)
    k = torch.randn(2, kv_heads, 20, qk_dim, generator=gen)
    v = torch.randn(2, kv_heads, 20, v_dim, generator=gen)
    return q, k, v, pos, mask


def test_flex_path_equals_block_mask_sdpa():
    q, k, v, pos, mask = packed_inputs()
    docs = docs_for(pos, mask)
    expected = sdpa_attention(q, k, v, docs.dense_mask())  # (B, L, H, D)
    with torch.no_grad(), force_attention_backend("flex"):
        out = sdpa_attention(q, k, v, docs)
    real = mask.bool()
    assert out.shape == expected.shape
    assert torch.allclose(out[real], expected[real], atol=1e-5), (out[real] - expected[real]).abs().max()
    # And without padding, 3 documents in every row, with a softmax scale.
    docs = docs_for(torch.tensor([list(range(5)) + list(range(7)) + list(range(8))]), None)
    q, k, v = (x[:1] for x in packed_inputs(seed=1)[:3])
    expected = sdpa_attention(q, k, v, docs.dense_mask(), scale=0.3)
    with torch.no_grad(), force_attention_backend("flex"):
        out = sdpa_attention(q, k, v, docs, scale=0.3)
    assert torch.allclose(out, expected, atol=1e-5)


class FlashStandIn:
    """`flash_attn_varlen_func` with flash-attn 2's signature: checks what flash-attn would reject, then runs each
    document with causal SDPA."""

    def __init__(self):
        self.calls = []

    def __call__(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
        causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
        return_attn_probs=False, block_table=None,
    ):
        total, heads, dim = q.shape
        assert q.dim() == k.dim() == v.dim() == 3, "flash-attn takes unpadded (total_tokens, heads, dim)"
        assert k.shape[0] == v.shape[0] == total and k.shape[1] == v.shape[1] and heads % k.shape[1] == 0
        assert k.shape[2] == v.shape[2] == dim and dim <= 256, "flash-attn 2 needs one head dim <= 256"
        assert q.dtype == k.dtype == v.dtype, "flash-attn needs one dtype for q, k and v"
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert int(cu_seqlens_q[0]) == 0 and int(cu_seqlens_q[-1]) == total
        lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        assert min(lengths) > 0 and max_seqlen_q == max(lengths) == max_seqlen_k
        assert isinstance(max_seqlen_q, int) and causal and dropout_p == 0.0
        self.calls.append(dict(heads=heads, kv_heads=k.shape[1], dim=dim, scale=softmax_scale, lengths=lengths))
        out = torch.empty_like(q[..., : v.shape[-1]])
        bounds = cu_seqlens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            doc = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]  # (1, h, n, dim)
            o = F.scaled_dot_product_attention(*doc, is_causal=True, scale=softmax_scale, enable_gqa=True)
            out[start:end] = o[0].transpose(0, 1)
        return out


@torch.library.custom_op("minillm_tests::flash_varlen", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              scale: float) -> torch.Tensor:
    return FlashStandIn()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)


@_flash_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def flash_as_custom_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                       softmax_scale=None, causal=False, **kwargs):
    """The flash stand-in as a torch custom op (forward only), which a compiled graph holds as one node, as it holds
    flash-attn's own kernels (registered as torch ops)."""
    return _flash_op(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale)


@pytest.mark.parametrize(
    "qk_dim,v_dim,scale", [(16, 16, None), (24, 16, 0.25), (12, 20, None)], ids=["gqa", "mla-dims", "odd-dims"]
)
def test_flash_varlen_path_equals_block_mask_sdpa(monkeypatch, qk_dim, v_dim, scale):
    flash = FlashStandIn()
    install_flash(monkeypatch, flash)
    q, k, v, pos, mask = packed_inputs(qk_dim, v_dim)
    docs = docs_for(pos, mask)
    expected = sdpa_attention(q, k, v, docs.dense_mask(), scale=scale)  # (B, L, H, Dv)
    with force_attention_backend("flash"):
        out = sdpa_attention(q, k, v, docs, scale=scale)
    real = mask.bool()
    assert out.shape == expected.shape
    assert torch.allclose(out[real], expected[real], atol=1e-5), (out[real] - expected[real]).abs().max()
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding rows: zeros, never NaN
    (call,) = flash.calls
    assert call["lengths"] == [5, 7, 8, 6, 9]  # padding dropped, documents cut at restarts and row ends
    assert (call["heads"], call["kv_heads"]) == (6, 2)  # GQA handed over natively, no repeat_kv
    all_padding = docs_for(pos, torch.zeros_like(mask))
    with force_attention_backend("flash"):
        assert torch.equal(sdpa_attention(q, k, v, all_padding), torch.zeros_like(out))
    assert call["dim"] == max(qk_dim, v_dim) + (-max(qk_dim, v_dim)) % 8  # one padded head dim
    expected_scale = scale if scale is not None else qk_dim**-0.5  # of the real qk dim, not the padded one
    assert call["scale"] == pytest.approx(expected_scale)


def test_flash_path_runs_in_the_autocast_dtype(monkeypatch):
    """Under autocast with fp32 weights, q/k arrive in fp32 and v in bf16 (as RoPE and the projections leave them):
    flash-attn gets all three in autocast's dtype, as SDPA casts them for itself."""
    install_flash(monkeypatch, FlashStandIn())
    q, k, v, pos, mask = packed_inputs()
    docs, real = docs_for(pos, mask), mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sdpa_attention(q, k, v.bfloat16(), docs.dense_mask())
        with force_attention_backend("flash"):
            out = sdpa_attention(q, k, v.bfloat16(), docs)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(out[real].float(), expected[real].float(), atol=2e-2)


def test_flash_path_gradients_equal_block_mask_sdpa(monkeypatch):
    install_flash(monkeypatch, FlashStandIn())
    q, k, v, pos, mask = packed_inputs(24, 16)
    docs = docs_for(pos, mask)
    real = mask.bool()

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with force_attention_backend(backend):
            out = sdpa_attention(*leaves, docs, scale=0.2)
        (out[real] ** 2).sum().backward()
        return [t.grad for t in leaves]

    for ours, theirs in zip(grads("flash"), grads("sdpa"), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------- whole models


def tiny(name):
    torch.manual_seed(0)
    layers = 4 if name == "mini_qwen3_next" else 2  # qwen3_next: 3 DeltaNet layers + 1 attention layer
    return build_model(name, "tiny", vocab_size=VOCAB, num_hidden_layers=layers, initializer_range=0.1).eval()


def packed_batch():
    lengths = [(7, 12, 9), (10, 18)]  # row 1: 2 documents + 0 padding; the mask pads row 1's last 4 tokens
    ids = random_ids(VOCAB, 2, 28, seed=5)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    mask = torch.ones(2, 28, dtype=torch.long)
    mask[1, 24:] = 0
    return ids, pos, mask


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_models_on_the_flash_path(monkeypatch, name):
    """Packed + padded batch: logits and gradients through flash varlen == through block-mask SDPA, and the
    document boundaries are derived once per forward, not once per layer."""
    flash = FlashStandIn()
    install_flash(monkeypatch, flash)
    derivations = []
    original = attention.varlen_index
    monkeypatch.setattr(attention, "varlen_index", lambda *a: derivations.append(1) or original(*a))
    model = tiny(name)
    ids, pos, mask = packed_batch()
    real = mask.bool()
    results = {}
    for backend in ("sdpa", "flash"):
        model.zero_grad()
        with force_attention_backend(backend):
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        logits[real].square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = logits.detach(), grads
    (ref_logits, ref_grads), (logits, grads) = results["sdpa"], results["flash"]
    assert (logits[real] - ref_logits[real]).abs().max().item() <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-5), n
    # Eval mode: the trunk's attention layers only (mini_deepseekv3's MTP block runs in training).
    attention_layers = sum(1 for m in model.model.modules() if type(m).__name__.endswith("Attention"))
    assert len(flash.calls) == attention_layers > 0
    assert len(derivations) == 1


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_a_trainer_batch_reaches_flash_without_a_read_back(monkeypatch, name):
    """A packed and padded training batch that the trainer moved to the device (its host tensors kept as host
    copies), forward and backward on the flash path, with the device emulated on the CPU: the unpadding indices,
    `cu_seqlens` and `max_seqlen` are found on the host, and nothing is read back (on a GPU, `varlen_index` on
    device tensors waited for it four times per forward)."""
    flash = FlashStandIn()
    model = tiny(name).train()
    ids, pos, mask = packed_batch()
    with EmulatedDevice(monkeypatch, model) as device:
        install_flash(monkeypatch, device.as_kernel(flash))
        batch = {"input_ids": ids, "labels": ids, "position_ids": pos, "attention_mask": mask}
        with force_attention_backend("flash"):
            model(**{k: device.move(v) for k, v in batch.items()}).loss.backward()
    assert flash.calls and flash.calls[0]["lengths"] == [7, 12, 9, 10, 14]
    assert device.reads == []


def test_deepseek_mtp_training_loss_on_the_flash_path(monkeypatch):
    """The MTP block reuses the trunk's PackedDocs: the training loss (LM + MTP + seq aux) is the same."""
    install_flash(monkeypatch, FlashStandIn())
    model = tiny("mini_deepseekv3").train()
    ids, pos, _ = packed_batch()
    losses = {}
    for backend in ("sdpa", "flash"):
        with force_attention_backend(backend):
            losses[backend] = model(input_ids=ids, position_ids=pos, labels=ids).loss
    assert torch.allclose(losses["flash"], losses["sdpa"], atol=1e-6)


def test_llama_on_the_flex_path():
    model = tiny("mini_llama3")
    ids, pos, mask = packed_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        with force_attention_backend("flex"):
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,kinds", [("mini_llama3", 1), ("mini_deepseekv3", 2), ("mini_qwen3_next", 2)])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_compiled_layers_keep_one_graph_with_packed_documents(name, kinds, backend, monkeypatch):
    """A packed and padded batch through decoder layers compiled as `--compile` does: one graph per layer kind on
    every packed-attention path. The model chooses the kernel and builds its input (dense mask, block mask, varlen
    index) before the layers run (`PackedDocs.prepare`); when each layer built it on first use, its builder and
    flash-attn's lookup broke every layer's graph (two llama layers: 5 graphs; mini_qwen3_next: 6)."""
    install_flash(monkeypatch, flash_as_custom_op)
    model = tiny(name)
    ids, pos, mask = packed_batch()
    with force_attention_backend(backend):
        assert compiled_layer_graphs(model, ids, backward=False, position_ids=pos, attention_mask=mask) == kinds


def test_packed_attention_is_prepared_for_the_kernel_the_layers_take(monkeypatch):
    """`prepare_attention` with the model's layout builds the input of the kernel the layers would choose, and only
    that one; the layers then use it (one varlen index per forward, no lookup of flash-attn inside the layers)."""
    flash = FlashStandIn()
    install_flash(monkeypatch, flash)
    _, pos, mask = packed_batch()
    layout = attention.AttentionLayout(heads=4, kv_heads=2, qk_dim=16, v_dim=16)
    for backend, form in (("flash", "varlen"), ("sdpa", "dense"), ("flex", "block")):
        with force_attention_backend(backend):
            docs = attention.prepare_attention(28, 28, mask, pos, None, 2, layout, torch.float32)
        assert docs.backend == backend and list(docs._cache) == [form]
    assert docs.flash is None
    with force_attention_backend("flash"):
        docs = attention.prepare_attention(28, 28, mask, pos, None, 2, layout, torch.float32)
    assert docs.flash == (flash, True)


def test_compiled_layers_on_the_flash_path(monkeypatch):
    """`--compile` (each decoder layer in torch.compile) with packed + padded rows: `PackedDocs` crosses the compiled
    region and the flash path (its data-dependent builders run eagerly) gives the eager dense-mask logits."""
    from minillm.training.trainer import compile_layers

    install_flash(monkeypatch, FlashStandIn())
    model = tiny("mini_llama3")
    ids, pos, mask = packed_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
        assert compile_layers(model) == 2
        with force_attention_backend("flash"):
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5
