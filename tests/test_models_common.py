"""The shared layers (norm, RoPE, attention masks, chunked loss), the registry and the output contract."""

import sys

import pytest
import torch
from device_reads import EmulatedDevice
from model_checks import compiled_layer_graphs
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_deepseek
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen3_next

from minillm.errors import UserError
from minillm.models import registry
from minillm.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    chunked_cross_entropy,
    document_ids_from_position_ids,
    position_ids_from_cu_seqlens,
    sdpa_attention,
    shift_targets,
)
from minillm.models.layers.loss import reference_cross_entropy
from minillm.models.outputs import MiniLLMOutput


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_bit_identical_to_references(dtype):
    x = torch.randn(2, 5, 32).to(dtype)
    ours, theirs = RMSNorm(32, eps=1e-6), hf_llama.LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(32))
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    assert torch.equal(ours(x), theirs(x))
    zc, ref = RMSNorm(32, eps=1e-6, zero_centered=True), hf_qwen3_next.Qwen3NextRMSNorm(32, eps=1e-6)
    assert torch.equal(zc.weight, torch.zeros(32))  # identity scale at init
    with torch.no_grad():
        zc.weight.copy_(torch.randn(32) * 0.1)
        ref.weight.copy_(zc.weight)
    assert torch.equal(zc.to(dtype)(x), ref.to(dtype)(x))


def same(pair_a, pair_b) -> bool:
    return all(torch.equal(a, b) for a, b in zip(pair_a, pair_b, strict=True))


def test_rope_matches_references_full_partial_interleaved():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11]])
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    rope = RotaryEmbedding(16, theta=10000.0)
    cos, sin = rope(q, pos)
    assert same(apply_rotary(q, k, cos, sin), hf_llama.apply_rotary_pos_emb(q, k, cos, sin))
    # Partial rotary (Qwen3-Next): only the first 4 channels rotate.
    cos4, sin4 = RotaryEmbedding(4, theta=10000.0)(q, pos)
    ours = apply_rotary(q, k, cos4, sin4)
    assert same(ours, hf_qwen3_next.apply_rotary_pos_emb(q, k, cos4, sin4))
    assert torch.equal(ours[0][..., 4:], q[..., 4:])
    # Interleaved pairs (DeepSeek-V3).
    ours = apply_rotary(q, k, cos, sin, interleaved=True)
    assert same(ours, hf_deepseek.apply_rotary_pos_emb_interleave(q, k, cos, sin))
    # Angles depend on positions only: a restarted document rotates like a fresh one.
    assert torch.equal(cos[0, 3:6], cos[0, 0:3])


def test_rope_scaled_types_delegate_to_transformers():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    )
    rope = RotaryEmbedding.from_config(cfg, 16)
    assert torch.allclose(rope.inv_freq, RotaryEmbedding(16, 10000.0).inv_freq / 4.0)


def test_document_ids_and_packed_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert torch.equal(position_ids_from_cu_seqlens(torch.tensor([0, 3, 5, 9], dtype=torch.int32)), pos)
    assert document_ids_from_position_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]
    mask = build_attention_mask(9, 9, position_ids=pos)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False, False]
    assert mask[8].tolist() == [False] * 5 + [True] * 4
    # Without restarts, plain causal attention (None -> SDPA is_causal) is exact.
    assert build_attention_mask(9, 9, position_ids=torch.arange(9)[None]) is None


def test_attention_mask_with_cache_and_padding():
    # 3 new queries after 4 cached keys, no padding: end-aligned causal mask.
    mask = build_attention_mask(3, 7)[0, 0]
    assert mask.int().tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert build_attention_mask(1, 7) is None  # one query sees every key
    # Left padding: real queries never see pad keys; pad rows stay finite.
    pad = torch.tensor([[0, 0, 1, 1, 1]])
    mask = build_attention_mask(5, 5, attention_mask=pad)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = sdpa_attention(q, k, v, mask)  # (B, L, H, D)
    assert torch.isfinite(out).all()
    alone = sdpa_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], None)
    assert torch.allclose(out[:, 2:], alone, atol=1e-6)


def test_attention_gqa_matches_repeated_heads():
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out = sdpa_attention(q, k, v, None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True
    ).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("normaliser", [None, 37, torch.tensor(37.0)])
def test_chunked_cross_entropy_matches_plain(normaliser):
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[1, :5] = -100
    targets = shift_targets(labels)
    loss = chunked_cross_entropy(hidden, weight, targets, normaliser, chunk_size=4)
    expected = reference_cross_entropy(hidden @ weight.t(), targets, normaliser)
    assert torch.allclose(loss, expected, atol=1e-6)
    g = torch.autograd.grad(loss, (hidden, weight))
    g_ref = torch.autograd.grad(expected, (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_ref, strict=True))


def test_chunked_cross_entropy_matmuls_run_in_the_autocast_dtype():
    """Under bf16 autocast every matmul of the loss runs in bf16, in every chunk: the weight gradient of the later
    chunks too (autocast does not cast an in-place `addmm_`, which would silently run in fp32), and the numbers
    still match the fp32 loss to bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm", "matmul"):
                self.dtypes.append(next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2
                                        and 50 in a.shape))  # an operand with the vocabulary dimension
            return func(*args, **(kwargs or {}))

    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as mode:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)  # 5 chunks
    assert len(mode.dtypes) == 15 and set(mode.dtypes) == {torch.bfloat16}  # logits, grad_h, grad_w per chunk
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    expected = reference_cross_entropy(hidden @ weight.t(), targets)
    ref_h, ref_w = torch.autograd.grad(expected, (hidden, weight))
    assert abs(loss.item() - expected.item()) < 0.05
    torch.testing.assert_close(grad_h, ref_h, rtol=0.05, atol=0.01)
    torch.testing.assert_close(grad_w, ref_w, rtol=0.05, atol=0.01)


def test_cpu_low_precision_loss_reuses_its_logit_buffers():
    """bf16 on a CPU: the chunk buffers are kept between calls (grown when a larger chunk comes) and never leak one
    call's numbers into the next."""
    import threading

    from minillm.models.layers.loss import _logit_buffers

    low, high = _logit_buffers(1000, torch.bfloat16, torch.device("cpu"))
    again_low, again_high = _logit_buffers(800, torch.bfloat16, torch.device("cpu"))
    assert (again_low.data_ptr(), again_high.data_ptr()) == (low.data_ptr(), high.data_ptr())
    assert high.dtype == torch.float32 and _logit_buffers(5000, torch.bfloat16, torch.device("cpu"))[0].numel() >= 5000
    other = []
    thread = threading.Thread(target=lambda: other.append(_logit_buffers(800, torch.bfloat16, torch.device("cpu"))))
    thread.start()
    thread.join()
    assert other[0][0].data_ptr() != low.data_ptr()  # per thread
    for rows, vocab in ((40, 50), (12, 30), (40, 50)):  # different sizes through the same buffers
        hidden, weight = torch.randn(rows, 16), torch.randn(vocab, 16)
        targets = torch.randint(0, vocab, (rows,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        expected = reference_cross_entropy((hidden.bfloat16() @ weight.bfloat16().t()).float(), targets)
        assert abs(loss.item() - expected.item()) < 1e-5


def test_cpu_low_precision_loss_pads_its_chunks_to_row_buckets(monkeypatch):
    """bf16 on a CPU: each chunk's rows are padded with zero rows to `row_bucket` (SFT's row count changes every
    step, and oneDNN compiles a kernel per shape), and the loss and gradients are those of the unpadded chunks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minillm.models.layers import loss as loss_module

    class MatmulRows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] == "mm":  # logits (m, V), grad_h (m, V) @ (V, D), grad_w (V, m) @ (m, D)
                self.rows.append(args[0].shape[0] if args[0].shape[0] != 50 else args[1].shape[0])
            return func(*args, **(kwargs or {}))

    hidden = torch.randn(45, 16, requires_grad=True)  # chunks of 16, 16 and 13 rows
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (45,))
    results = []
    for pad in (True, False):
        if not pad:
            monkeypatch.setattr(loss_module, "_pad_rows", lambda h: h)
        with torch.autocast("cpu", dtype=torch.bfloat16), MatmulRows() as mode:
            loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        results.append((mode.rows, loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    (rows, loss, grad_h, grad_w), (exact_rows, want, want_h, want_w) = results
    assert rows == [32] * 9 and exact_rows == [16] * 6 + [13] * 3
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    torch.testing.assert_close(grad_h, want_h, rtol=0, atol=0)  # padding rows are dropped before they reach it
    torch.testing.assert_close(grad_w, want_w, rtol=1e-2, atol=1e-5)  # zeros added: at most a rounding apart


def test_cpu_fused_loss_kernel_matches_the_eager_path_and_falls_back(monkeypatch, capsys):
    """bf16 on a CPU with a large vocabulary: the softmax, loss and gradient run as one compiled kernel, with the
    eager path's numbers (the same fp32 math, summed in another order). Where the kernel cannot be built, one
    note on stderr and the eager path from then on."""
    from minillm.models.layers import loss as loss_module

    hidden = torch.randn(45, 16, requires_grad=True)  # chunks of 16, 16 and 13 rows, padded to 32
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (45,))

    def run(kernel):
        with loss_module.force_loss_kernel(kernel), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

    rows_seen = []
    fused = loss_module._fused_softmax_loss
    monkeypatch.setattr(loss_module, "_fused_softmax_loss", lambda x, t: rows_seen.append(x.shape) or fused(x, t))
    (loss, grad_h, grad_w), (want, want_h, want_w) = run("compiled"), run("eager")
    assert rows_seen == [(32, 300)] * 3  # every chunk took the kernel
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    torch.testing.assert_close(grad_h, want_h, rtol=1e-2, atol=1e-5)  # bf16 gradients: a rounding apart at most
    torch.testing.assert_close(grad_w, want_w, rtol=1e-2, atol=1e-5)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not loss_module._use_fused_loss(1024, 8000, cpu) and loss_module._use_fused_loss(1024, 32000, cpu)  # by size
    assert loss_module._use_fused_loss(16, 8000, gpu)  # any size on a GPU
    assert not loss_module._use_fused_loss(1024, 64000, torch.device("mps"))  # unless pinned

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        return fails

    monkeypatch.setattr(loss_module, "_fused_kernel", {})
    monkeypatch.setattr(torch, "compile", no_compiler)
    (loss, grad_h, _), (again, *_) = run("compiled"), run("compiled")
    assert loss.item() == want.item() == again.item() and torch.equal(grad_h, want_h)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be compiled for cpu (InductorError: no C++ compiler found)" in err
    assert not loss_module._use_fused_loss(1024, 32000, cpu)
    assert loss_module._use_fused_loss(1024, 32000, gpu)  # a CPU's failure leaves the GPU's kernel alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_log_softmax_loss_path_matches_the_in_place_path(monkeypatch, dtype):
    """The GPU's two-pass path (`_log_softmax_loss`), taken here on the CPU: the same loss to fp32 rounding and the
    same gradients to one rounding of the low-precision softmax, with and without gradients."""
    from minillm.models.layers import loss as loss_module

    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    results, calls = {}, []
    two_pass_loss = loss_module._log_softmax_loss
    monkeypatch.setattr(loss_module, "_log_softmax_loss", lambda *args: calls.append(1) or two_pass_loss(*args))
    for two_pass in (True, False):
        monkeypatch.setattr(loss_module, "log_softmax_path", lambda device, two_pass=two_pass: two_pass)
        with torch.autocast("cpu", dtype=dtype):
            loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
            with torch.no_grad():
                loss_no_grad = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
        results[two_pass] = (loss.detach(), loss_no_grad, *torch.autograd.grad(loss, (hidden, weight)))
    assert len(calls) == 6  # 3 chunks, with and without gradients, all in the two-pass run
    (loss, loss_no_grad, grad_h, grad_w), (want, _, want_h, want_w) = results[True], results[False]
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item() and loss_no_grad.item() == loss.item()
    torch.testing.assert_close(grad_h, want_h, rtol=0.02, atol=2e-3)
    torch.testing.assert_close(grad_w, want_w, rtol=0.02, atol=2e-3)


def test_fused_loss_kernel_out_of_memory_is_raised_not_taken_for_a_build_failure(monkeypatch):
    """An out-of-memory error inside the fused kernel reaches the caller, and the kernel stays in use: it is the
    device that is full, not the kernel that cannot be built (the eager fallback would need more memory)."""
    from minillm.models.layers import loss as loss_module

    def full(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(loss_module, "_fused_kernel", {"cpu": {"fn": full}})
    hidden = torch.randn(45, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    with loss_module.force_loss_kernel("compiled"), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(torch.OutOfMemoryError):
            chunked_cross_entropy(hidden, weight, torch.randint(0, 300, (45,)), chunk_size=16)
    assert "failed" not in loss_module._fused_kernel["cpu"]


def test_default_loss_chunk_size_by_device(monkeypatch):
    """Unset `loss_chunk_size` (the configs' default): 1,024 tokens a chunk on a CPU (and on devices not
    measured); on a CUDA GPU multiples of 1,024 making about 256M logits, at least 1,024. A chunk size in the config
    is used as given."""
    from minillm.models.layers import loss as loss_module

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loss_module.default_chunk_size(64000, cpu) == loss_module.default_chunk_size(8000, cpu) == 1024
    sizes = [loss_module.default_chunk_size(vocab, gpu) for vocab in (64000, 32000, 151936, 400000)]
    assert sizes == [4096, 8192, 1024, 1024]
    assert loss_module.default_chunk_size(64000, torch.device("mps")) == 1024  # measured on CUDA only
    seen = []
    monkeypatch.setattr(loss_module._LinearCrossEntropySum, "apply", lambda *args: seen.append(args[3]) or args[0].sum())
    for chunk, want in ((None, 1024), (77, 77)):
        head = registry.build_model("mini_llama3", "tiny", vocab_size=300, loss_chunk_size=chunk).lm_head
        head(torch.randn(2, 5, head.weight.shape[1]), torch.zeros(2, 5, dtype=torch.long))
        assert seen.pop() == want


def test_chunked_cross_entropy_keeps_no_full_logits():
    """Autograd saves only the two gradient tensors (N x D and V x D), never N x V logits."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, torch.randint(0, 1000, (64,)), chunk_size=16)
    assert saved and max(saved) <= 1000 * 8  # the V x D weight gradient; 64 x 1000 logits would be larger


def test_chunked_cross_entropy_under_no_grad_computes_no_gradients():
    """Validation runs under torch.no_grad with parameters that require grad: no V x D gradient buffer is made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new memory
                    self.shapes.add(tuple(sorted(t.shape)))  # either orientation
            return out

    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    with torch.no_grad(), Shapes() as mode:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert (8, 1000) not in mode.shapes  # no fp32 V x D weight gradient (nor the softmax backward work)
    expected = reference_cross_entropy(hidden.detach() @ weight.detach().t(), targets)
    assert torch.allclose(loss, expected, atol=1e-6)
    with Shapes() as mode:  # with grad enabled the same call does build them (the check above can fail)
        chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert (8, 1000) in mode.shapes


def test_shift_targets_packed_boundaries():
    labels = torch.tensor([[10, 11, 12, 20, 21, 30]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert shift_targets(labels).tolist() == [[11, 12, 20, 21, 30, -100]]
    assert shift_targets(labels, pos).tolist() == [[11, 12, -100, 21, -100, -100]]
    assert shift_targets(labels, pos, shift=2).tolist() == [[12, -100, -100, -100, -100, -100]]


def test_all_ignored_mean_is_zero():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    assert chunked_cross_entropy(hidden, weight, torch.full((4,), -100)).item() == 0.0


def test_registry_errors_and_presets():
    assert registry.MODEL_NAMES == ("mini_llama3", "mini_deepseekv3", "mini_qwen3_next")
    with pytest.raises(UserError, match="mini_llama3, mini_deepseekv3, mini_qwen3_next"):
        registry.build_config("gpt2")
    with pytest.raises(UserError, match="known presets: tiny, small, base"):
        registry.build_config("mini_llama3", "huge")
    config = registry.build_config("mini_llama3", "base", num_hidden_layers=2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 2, 12)
    assert config.vocab_size == 32004
    assert registry.known_presets("mini_llama3") == ("tiny", "small", "base")


def test_auto_classes_know_our_models():
    from transformers import AutoConfig, AutoModelForCausalLM

    import minillm  # noqa: F401

    for name in registry.MODEL_NAMES:
        config = AutoConfig.for_model(name)
        assert config.model_type == name and type(config) is registry.model_package(name).CONFIG_CLASS
    config = AutoConfig.for_model(
        "mini_llama3",
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=64,
        intermediate_size=64,
    )
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == "MiniLlama3ForCausalLM"


def test_output_contract():
    out = MiniLLMOutput(loss=torch.tensor(1.0), cache="c", aux_losses={"lm": torch.tensor(1.0)})
    assert out.past_key_values == "c" and out["cache"] == "c"
    assert out.logits is None and out.expert_counts is None


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_padding_is_never_a_target(name):
    """labels=input_ids on a right-padded batch: every architecture ignores the padded targets (the loss equals the
    unpadded row's), whether or not the collator already set them to -100."""
    torch.manual_seed(0)
    model = registry.build_model(name, "tiny", vocab_size=256, num_hidden_layers=2).eval()
    ids = torch.randint(1, 256, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 13), pad id 0
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = model(input_ids=ids, labels=ids).loss
        with_pad = model(input_ids=padded, attention_mask=mask, labels=padded).loss
    assert torch.allclose(alone, with_pad, atol=1e-5), (alone.item(), with_pad.item())


def _sft_batch() -> dict[str, torch.Tensor]:
    """A padded batch of packed documents with prompt tokens, as the SFT collator makes them."""
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    positions = torch.tensor([list(range(10)) + list(range(14)), list(range(24))])  # row 0 packs two documents
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0  # row 1 ends in padding
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_training_step_on_a_device_reads_nothing_back(name, stage, monkeypatch):
    """Forward and backward of a batch that the trainer moved to the device (its host tensors kept as host copies),
    with the device emulated on the CPU: nothing is read back from the device. Which rows of the loss have targets,
    whether the mask holds padding and whether the positions restart are answered on the host copies. (Before, one
    `nonzero` per output head waited for the device in every step, and an SFT batch's padding and restart
    questions two reads more.)"""
    from minillm.models.layers.linear import onednn_available

    onednn_available()  # the one-off kernel probe reads a result back; not part of a step
    model = registry.build_model(name, "tiny", vocab_size=256, num_hidden_layers=2).train()
    if stage == "pretrain":
        ids = torch.randint(1, 256, (2, 24))
        host_batch = {"input_ids": ids, "labels": ids}
    else:
        host_batch = _sft_batch()
    with EmulatedDevice(monkeypatch, model) as device:
        batch = {k: device.move(v) for k, v in host_batch.items()}
        out = model(**batch)
        out.loss.backward()
    assert device.reads == []
    torch.testing.assert_close(out.loss, model(**host_batch).loss)  # the same loss as from host tensors


@pytest.mark.parametrize("name", registry.MODEL_NAMES)
def test_without_host_copies_each_question_is_read_once_per_forward(name, monkeypatch):
    """The same SFT batch created on the device (no host copies): whether the mask holds padding and whether the
    positions restart are each read back once per forward, whatever the number of places that need the answer
    (the attention mask's builders, the MoE routing, Gated DeltaNet asked again: up to six reads), plus the loss's
    target rows, one `nonzero` per output head."""
    from collections import Counter

    from minillm.models.layers.linear import onednn_available

    onednn_available()
    model = registry.build_model(name, "tiny", vocab_size=256).train()
    heads = 1 + getattr(model.config, "num_mtp_layers", 0)
    with EmulatedDevice(monkeypatch, model) as device:
        batch = {k: v + 0 * torch.zeros((), dtype=v.dtype) for k, v in _sft_batch().items()}  # made on the device
        out = model(**batch)
        out.loss.backward()
    assert Counter(device.reads) == {"read": 2, "nonzero": heads}, device.reads


def test_a_batch_question_is_asked_again_after_its_tensor_changes(monkeypatch):
    """`has_padding` / `has_document_restarts` keep their answer for the tensor as it is: an in-place change, a copy
    or an inference-mode tensor (which keeps no version) is asked again; and a decoding step with a past does not
    ask whether its positions restart (only a forward without past can hold packed documents)."""
    import copy

    from minillm.models.layers.attention import build_attention_mask, has_document_restarts, has_padding

    with EmulatedDevice(monkeypatch) as device:
        mask = torch.ones(2, 6, dtype=torch.long)  # made on the device
        mask[1, 5] = 0
        assert has_padding(mask) and has_padding(mask) and device.reads == ["read"]  # asked twice, read once
        mask.fill_(1)
        assert not has_padding(mask) and device.reads == ["read"] * 2
        duplicate = copy.deepcopy(mask)
        duplicate[0, 0] = 0
        assert has_padding(duplicate) and not has_padding(mask)
        with torch.inference_mode():
            frozen = torch.ones(1, 4, dtype=torch.long)
            assert not has_padding(frozen)
            frozen[0, 0] = 0
            assert has_padding(frozen)
        positions = torch.full((1, 1), 7)  # one new token after a past of 7
        device.reads.clear()
        build_attention_mask(1, 8, torch.ones(1, 8, dtype=torch.long), positions)
        assert device.reads == ["read"]  # the padding question only
        assert not has_document_restarts(torch.arange(5)[None])


def test_host_copies_answer_until_either_side_changes(monkeypatch):
    """A device tensor moved from the host is asked on its host copy (no read), as are tensors derived from it with
    `with_host_copy`; once the device tensor or the host tensor changes in place, the device is read again."""
    from minillm.models.layers.attention import has_padding
    from minillm.models.layers.loss import shift_targets, target_rows

    with EmulatedDevice(monkeypatch) as device:
        host = torch.tensor([[1, 1, 1, 0]])
        mask = device.move(host)
        assert has_padding(mask) and device.reads == []
        mask[0, 3] = 1  # changed on the device: the host copy no longer holds its values
        assert not has_padding(mask) and device.reads == ["read"]
        labels = device.move(torch.tensor([[5, -100, 7, 8]]))
        positions = device.move(torch.tensor([[0, 1, 0, 1]]))
        rows = target_rows(shift_targets(labels, positions))  # [-100 (prompt), -100 (a new document), 8, -100]
        assert rows.tolist() == [2] and device.reads == ["read", "tolist"]  # the test's own read of the answer
        device.reads.clear()
        host_labels = torch.tensor([[5, 6, 7, 8]])
        labels = device.move(host_labels)
        host_labels[0, 2] = -100  # the host tensor changed after the copy
        assert target_rows(shift_targets(labels)).numel() == 3 and device.reads == ["nonzero"]


@pytest.mark.parametrize("name", ["mini_deepseekv3", "mini_qwen3_next"])
def test_compiled_layers_keep_one_graph_on_the_gpu_code_paths(name, monkeypatch):
    """`--compile` compiles each decoder layer into one graph per layer kind, also where the dispatch asks what only
    a GPU asks: whether grouped_mm's operands are aligned (`data_ptr()` broke the graph at every expert product),
    whether fla and causal-conv1d are installed (an import broke it around every short conv and delta rule).
    Emulated on the CPU: alignment checked (as on CUDA), the kernels' device types widened to the CPU with neither
    package installed, expert groups unpadded (the CPU's bf16 padding runs eagerly by design)."""
    from minillm.models.layers import moe
    from minillm.models.mini_qwen3_next import fla_kernels

    monkeypatch.setattr(moe, "_CPU_NEEDS_ALIGNMENT", True)
    monkeypatch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ("cpu",))
    for module in ("fla", "causal_conv1d"):  # not installed, whatever this machine has: the import runs and fails
        monkeypatch.setitem(sys.modules, module, None)
    torch.manual_seed(0)
    model = registry.build_model(name, "tiny", vocab_size=256, num_hidden_layers=2,
                                 **({"num_mtp_layers": 0} if name == "mini_deepseekv3" else
                                    {"layer_types": ["linear_attention", "full_attention"]}))
    graphs = compiled_layer_graphs(model, torch.randint(1, 256, (2, 64)))
    assert graphs == 2  # a dense/attention layer and a MoE/linear-attention layer


def test_the_gpu_capability_question_is_a_constant_under_compile(monkeypatch):
    """grouped_mm's CUDA check asks for the device's compute capability; a compiled layer takes the answer as a
    constant instead of breaking its graph there."""
    from minillm.models.layers import moe

    def capability(device=None):  # a stand-in the tracer cannot follow, as it cannot the real query
        torch._dynamo.graph_break()
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda t: t * 2 if moe._sm80_or_newer(torch.device("cuda", 0)) else t,
                                 fullgraph=True, backend="eager")  # fullgraph: a break would raise
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_keeps_every_gradient(name, reentrant):
    """Checkpointed layers give the gradients of plain ones, balance losses included. Under reentrant checkpointing
    (which tracks a layer's top-level output tensors only) Qwen3-Next's router probabilities, returned inside a
    nested tuple, came back without a gradient: its router aux loss added to the loss and trained nothing."""
    overrides = {"router_aux_loss_coef": 0.1} if name == "mini_qwen3_next" else {}
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = registry.build_model(name, "tiny", vocab_size=256, num_hidden_layers=2, **overrides).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for n, g in plain.items():
        assert torch.allclose(g, checkpointed[n], atol=1e-6), n
