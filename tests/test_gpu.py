"""The CUDA code paths, on a GPU: skipped on machines without one (CI), run by `scripts/gpu_bench.sh`.

What only a GPU exercises: the three models against their transformers references on CUDA, the grouped_mm CUDA
kernel against the padded fallback, packed-document attention through the compiled `flex_attention` against the
dense-mask SDPA path, flash-linear-attention's Gated DeltaNet kernels (when installed) against our torch path, and
how often a training forward + backward makes the host wait for the GPU.
Tolerances are loose where a kernel legitimately rounds differently (TF32 in Triton kernels, bf16); a wrong layout
or a missed mask gives errors of order one, far above them.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from model_checks import compiled_layer_graphs
from train_helpers import trainer_step

import minillm  # noqa: F401  (registers the Auto classes)
from minillm.models.layers import attention
from minillm.models.layers.attention import PackedDocs, force_attention_backend, sdpa_attention
from minillm.models.layers.moe import grouped_mm, grouped_mm_applies
from minillm.models.mini_qwen3_next import fla_kernels
from minillm.models.registry import MODEL_NAMES, build_model, model_package

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
VOCAB = 512


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls and convolutions in full precision (cuDNN's TF32 default would blur the fp32 comparisons)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(CUDA)


def _tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, "tiny", vocab_size=VOCAB).to(CUDA)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def host_waits(step) -> list[str]:
    """The waits for the GPU that one call of `step` makes (CUDA's sync debug mode), after a warm-up call (one-off
    kernel probes and compilations)."""
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_match_their_reference_on_cuda(name):
    """fp32 logits within 1e-3 of the reference (TF32 in Triton kernels when flash-linear-attention is installed
    is the loosest part), and bf16 autocast losses within 2%."""
    model = _tiny(name).eval()
    ref = model_package(name).to_reference(model).to(CUDA).eval()
    ids = _ids(2, 64)
    with torch.no_grad():  # no cache: the numbers, not the cache API of the installed transformers
        logits, ref_logits = model(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits
        diff = (logits - ref_logits).abs().max().item()
        assert diff <= 1e-3, f"{name}: fp32 logits differ from the reference by {diff:.3g} on CUDA"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = model(input_ids=ids, labels=ids, use_cache=False).loss
            theirs = ref(input_ids=ids, labels=ids, use_cache=False).loss
        assert abs(ours.item() - theirs.item()) <= 0.02 * theirs.item(), f"{name}: bf16 loss {ours} != {theirs}"


def test_grouped_mm_kernel_matches_padded_fallback_on_cuda():
    """bf16, jagged groups including empty ones, a transposed weight view as the experts pass it; forward and
    both gradients."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 1, 0, 33, 8, 0])
    x = torch.randn(int(counts.sum()), 64, generator=gen).to(CUDA, torch.bfloat16)
    w = torch.randn(len(counts), 96, 64, generator=gen).to(CUDA, torch.bfloat16)  # stored (G, OUT, IN)
    assert grouped_mm_applies(x, w.transpose(1, 2))
    results = []
    for backend in ("grouped_mm", "padded"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = grouped_mm(xb, wb.transpose(1, 2), counts.to(CUDA), backend=backend)
        out.float().pow(2).sum().backward()
        results.append((out, xb.grad, wb.grad))
    for got, want in zip(*results, strict=True):
        assert _relative(got, want) <= 1e-2


@pytest.mark.parametrize("heads,kv_heads,qk_dim,v_dim", [(4, 2, 24, 24), (8, 2, 64, 64), (4, 4, 32, 16)])
def test_packed_attention_through_flex_matches_dense_masks(heads, kv_heads, qk_dim, v_dim):
    """The attention layer alone, bf16, packed documents and a padded tail: flex_attention with its block mask
    against SDPA with the dense block-diagonal mask, outputs and the gradients of q, k and v. GQA with the tiny
    mini_llama3's head dim (24, not a power of two), GQA at 64, and MLA's shape (qk 32, v 16). Rows of 128 tokens:
    flex compiles no kernel for GQA at lengths that are not a multiple of its block (the dispatch sends those to
    SDPA, checked last)."""
    gen = torch.Generator().manual_seed(0)
    position_ids = torch.cat([torch.arange(n) for n in (50, 45, 33)])[None]  # (1, 128): three documents
    attention_mask = torch.ones(2, 128, dtype=torch.long)
    attention_mask[1, 120:] = 0  # row 1 ends in padding
    docs = PackedDocs(position_ids, attention_mask, batch_size=2, device=CUDA)
    q = torch.randn(2, heads, 128, qk_dim, generator=gen)
    k = torch.randn(2, kv_heads, 128, qk_dim, generator=gen)
    v = torch.randn(2, kv_heads, 128, v_dim, generator=gen)
    real = attention_mask.bool().to(CUDA)  # padding rows are finite garbage on both paths: compared elsewhere
    results = []
    for backend in ("flex", "sdpa"):
        inputs = [t.to(CUDA, torch.bfloat16).requires_grad_() for t in (q, k, v)]
        with force_attention_backend(backend):
            out = sdpa_attention(*inputs, docs)  # (B, L, H, Dv)
        (out.float()[real].square().sum()).backward()
        results.append([out.detach()[real]] + [t.grad for t in inputs])
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert _relative(got, want) <= 0.02, f"flex {name} differs from SDPA's by {_relative(got, want):.3g}"
    short = torch.zeros(2, heads, 96, qk_dim, device=CUDA, dtype=torch.bfloat16)
    expected = "sdpa" if heads != kv_heads else "flex"  # GQA at 96 tokens: no flex kernel compiled (H200, torch 2.11)
    if attention.flash_varlen_function() is None:  # with flash-attn installed, flash comes first
        assert attention.packed_backend(short, short, kv_heads=kv_heads) == expected


def test_mini_llama3_trains_on_packed_documents_through_flex():
    """The whole model under bf16 autocast, packed rows: flex gives SDPA's loss and gradients to bf16 rounding.
    (In fp32 the dispatch never takes flex: on an H200 with torch 2.11 compiling it for GQA layers failed.)"""
    model = _tiny("mini_llama3").train()
    ids = _ids(2, 128, seed=1)
    position_ids = torch.cat([torch.arange(n) for n in (50, 45, 33)])[None].expand(2, -1).to(CUDA)
    results = []
    for backend in ("flex", "sdpa"):
        model.zero_grad()
        with force_attention_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (flex_loss, flex_grads), (sdpa_loss, sdpa_grads) = results
    assert abs(flex_loss.item() - sdpa_loss.item()) <= 1e-3 * sdpa_loss.item()
    worst = max(_relative(flex_grads[key], want) for key, want in sdpa_grads.items())
    assert worst <= 0.05, f"flex gradients differ from SDPA's by {worst:.3g} (relative to the largest)"


@pytest.mark.parametrize("packed", [False, True])
def test_flash_linear_attention_kernels_match_the_torch_path(packed):
    """mini_qwen3_next under bf16 autocast: loss and gradients with fla's Gated DeltaNet kernels against our torch
    chunked delta rule, plain rows and packed documents (fla's `cu_seqlens` varlen path)."""
    if fla_kernels.fla_ops() is None:
        pytest.skip("flash-linear-attention is not installed")
    model = _tiny("mini_qwen3_next").train()
    key_dim, value_dim = model.config.linear_key_head_dim, model.config.linear_value_head_dim
    if not fla_kernels.fla_works(str(CUDA), torch.bfloat16, key_dim, value_dim):
        pytest.skip("flash-linear-attention's kernels failed their test call on this GPU (see the warning)")
    ids = _ids(2, 128, seed=2)
    position_ids = None
    if packed:
        position_ids = torch.cat([torch.arange(n) for n in (50, 45, 33)])[None].expand(2, -1).to(CUDA)

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _grads(model)

    calls = []
    original = fla_kernels.fla_ops().chunk_gated_delta_rule

    def counting(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens") is not None)
        return original(*args, **kwargs)

    fla_kernels.fla_ops().chunk_gated_delta_rule = counting
    try:
        fla_loss, fla_grads = loss_and_grads()
    finally:
        fla_kernels.fla_ops().chunk_gated_delta_rule = original
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fla_kernels, "KERNEL_DEVICE_TYPES", ())  # the torch path
        torch_loss, torch_grads = loss_and_grads()
    assert calls and all(varlen == packed for varlen in calls), calls
    assert abs(fla_loss.item() - torch_loss.item()) <= 0.01 * torch_loss.item()
    worst = max(_relative(fla_grads[key], want) for key, want in torch_grads.items())
    assert worst <= 0.05, f"fla gradients differ from the torch path's by {worst:.3g} (relative to the largest)"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_training_step_waits_for_the_gpu_only_without_host_copies(name):
    """bf16 forward + backward under `torch.cuda.set_sync_debug_mode("warn")`: a pretraining batch moved from the
    host as the trainer moves it (`tensor_memo.to_device`, host copies kept) and a packed SFT batch the same way,
    no wait; the pretraining batch made on the GPU, one wait per output head (the chunked loss's `nonzero` over its
    target rows). tests/test_models_common.py counts the same on the CPU, with the device emulated."""
    from minillm.models.layers.tensor_memo import to_device

    model = _tiny(name).train()
    heads = 1 + getattr(model.config, "num_mtp_layers", 0)
    host_ids = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(40), torch.arange(24)])[None].repeat(2, 1)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 56:] = 0

    def step(**batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()

    def moved(**host):
        return lambda: step(**{k: to_device(v, CUDA) for k, v in host.items()})

    assert host_waits(moved(input_ids=host_ids, labels=host_ids)) == []
    labels = host_ids.masked_fill(mask == 0, -100)
    assert host_waits(moved(input_ids=host_ids, labels=labels, position_ids=positions, attention_mask=mask)) == []
    ids = host_ids.to(CUDA)
    assert len(host_waits(lambda: step(input_ids=ids, labels=ids))) <= heads


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_trainer_step_waits_for_the_gpu_only_for_the_finite_check(name):
    """The trainer's own step (`forward_backward` from host batches, then `optimizer_step`: clipping, fused AdamW,
    scheduler, MoE bias update) under `torch.cuda.set_sync_debug_mode("warn")`: the non-finite check's wait, no
    more; none where fused AdamW drops a bad step on the device (the loop's default; it reads the flag a step
    later). (The loss's target rows were one more per output head until they were found on the batch's host copy;
    `torch.tensor(value, device="cuda")` for the loss normaliser one more: a copy from pageable memory waits for
    all queued work.)"""
    _, trainer_step_on = trainer_step(name, "bf16", seq_len=64, vocab_size=VOCAB)
    ids = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0)).pin_memory()
    for skip_on_device, most in ((False, 1), (True, 0)):
        def step(skip_on_device=skip_on_device):
            assert not trainer_step_on([{"input_ids": ids, "labels": ids}], skip_on_device=skip_on_device).skipped

        waits = host_waits(step)
        assert len(waits) <= most, (skip_on_device, waits)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compiled_layers_keep_one_graph_per_layer_kind_on_cuda(name, monkeypatch):
    """Each decoder layer compiled (as `--compile` does; the tracer decides the graphs, so the quick "eager" backend
    shows them), bf16 forward + backward: one graph per layer kind, no breaks at grouped_mm's alignment check or the
    fla / causal-conv1d dispatch (asked with neither installed: fla's own kernels are not traced).
    tests/test_models_common.py emulates these paths on the CPU."""
    for module in ("fla", "causal_conv1d"):  # not installed, whatever the machine has: the import runs and fails
        monkeypatch.setitem(sys.modules, module, None)
    torch.manual_seed(0)
    overrides = {"num_mtp_layers": 0} if name == "mini_deepseekv3" else {}
    if name == "mini_qwen3_next":
        overrides["layer_types"] = ["linear_attention", "full_attention"]
    model = build_model(name, "tiny", vocab_size=VOCAB, num_hidden_layers=2, **overrides).to(CUDA)
    graphs = compiled_layer_graphs(model, _ids(2, 128))
    assert graphs <= 2, f"{graphs} graphs for 2 layers: the compiled layers break"
    # packed and padded (SFT): the packed-attention kernel's input is built before the layers (flash-attn's varlen
    # index, or flex's block mask); forward only (flex's backward is not what is counted here)
    positions = torch.cat([torch.arange(50), torch.arange(78)])[None].repeat(2, 1).to(CUDA)
    mask = torch.ones(2, 128, dtype=torch.long, device=CUDA)
    mask[1, 100:] = 0
    graphs = compiled_layer_graphs(model, _ids(2, 128), backward=False, position_ids=positions, attention_mask=mask)
    assert graphs <= 2, f"{graphs} graphs for 2 layers with packed documents: the compiled layers break"


@pytest.mark.parametrize("kernel", ["compiled", "eager"])
def test_bf16_chunked_loss_matches_the_fp32_loss_on_cuda(kernel):
    """The GPU's bf16 loss, with the fused softmax kernel and without, in chunks of the default size and of 300 rows
    (a short last chunk; the default is one chunk here): the loss within bf16 rounding of the fp32 plain cross-entropy, the gradients of the
    hidden states and of the head weight (summed in fp32 by cuBLAS over the chunks) within a few roundings."""
    from minillm.models.layers import loss as loss_module

    torch.manual_seed(0)
    hidden = (torch.randn(1000, 64, device=CUDA) * 0.5).requires_grad_()
    weight = (torch.randn(3000, 64, device=CUDA) * 0.2).requires_grad_()
    targets = torch.randint(0, 3000, (1000,), device=CUDA)
    targets[::7] = -100
    want = loss_module.reference_cross_entropy(hidden @ weight.t(), targets)
    want_h, want_w = torch.autograd.grad(want, (hidden, weight))
    for chunk in (None, 300):
        with loss_module.force_loss_kernel(kernel), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_module.chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)
        grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
        assert abs(loss.item() - want.item()) < 1e-2 * want.item()
        assert _relative(grad_h, want_h) < 2e-2 and _relative(grad_w, want_w) < 2e-2
    if kernel == "compiled":
        assert "failed" not in loss_module._fused_kernel.get("cuda", {})
