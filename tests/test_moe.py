"""Routed experts (minillm/models/layers/moe.py) against a naive per-expert loop and the transformers layout."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from minillm.models.layers.moe import (
    RoutedExperts,
    combine,
    dispatch,
    expert_counts,
    force_moe_group_sizes,
    grouped_mm,
    grouped_mm_applies,
    row_bucket,
)

E, D, I, T, K = 6, 16, 8, 20, 2  # noqa: E741  (the shape legend of moe.py)


def naive_experts(experts: RoutedExperts, x, topk_idx, topk_weight):
    """The textbook loop: every token, every chosen expert, one small SwiGLU."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[t, k])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] = out[t] + topk_weight[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def routing_with_idle_experts(seed=0):
    """Top-k choices that never use experts 1 and 4 (zero-token experts) and are unevenly loaded."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor([0, 2, 3, 5])
    scores = torch.rand(T, len(used), generator=g)
    scores[:, 0] += 0.5  # expert 0 gets most tokens
    topk_idx = used[scores.topk(K, dim=-1).indices]  # (T, K) distinct experts per token
    topk_weight = torch.rand(T, K, generator=g)
    return topk_idx, topk_weight


@pytest.mark.parametrize("backend", ["grouped_mm", "padded"])
def test_forward_and_gradients_match_naive_loop(backend):
    if backend == "grouped_mm" and not grouped_mm_applies(torch.zeros(2, D), torch.zeros(E, D, 2 * I)):
        pytest.skip("grouped_mm kernel not available on this torch build")
    experts = RoutedExperts(E, D, I, backend=backend)
    x = torch.randn(T, D, requires_grad=True)
    topk_idx, topk_weight = routing_with_idle_experts()
    topk_weight.requires_grad_(True)

    out = experts(x, topk_idx, topk_weight)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(
        (out * grad_out).sum(), [x, topk_weight, experts.gate_up_proj, experts.down_proj]
    )

    ref = naive_experts(experts, x, topk_idx, topk_weight)
    ref_grads = torch.autograd.grad(
        (ref * grad_out).sum(), [x, topk_weight, experts.gate_up_proj, experts.down_proj]
    )

    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # idle experts get exactly zero gradient
    for e in (1, 4):
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


def test_backends_agree_in_bf16_and_with_expanded_grad():
    experts = RoutedExperts(E, D, I).to(torch.bfloat16)
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    topk_idx, topk_weight = routing_with_idle_experts(1)
    outs = []
    for backend in ("grouped_mm", "padded"):
        experts.backend = backend
        if backend == "grouped_mm" and not grouped_mm_applies(x, experts.gate_up_proj):
            continue
        out = experts(x, topk_idx, topk_weight)
        out.sum().backward()  # .sum() hands back an expanded (zero-stride) gradient
        outs.append(out.detach())
        assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    if len(outs) == 2:
        torch.testing.assert_close(outs[0], outs[1], atol=1e-2, rtol=1e-2)


def test_all_tokens_on_one_expert_and_empty_input():
    experts = RoutedExperts(E, D, I)
    x = torch.randn(5, D)
    topk_idx = torch.full((5, 1), 3)
    topk_weight = torch.ones(5, 1)
    torch.testing.assert_close(
        experts(x, topk_idx, topk_weight), naive_experts(experts, x, topk_idx, topk_weight)
    )
    empty = experts(torch.zeros(0, D), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
    assert empty.shape == (0, D)


def test_dispatch_combine_and_counts():
    topk_idx, topk_weight = routing_with_idle_experts()
    counts = expert_counts(topk_idx, E)
    assert counts.tolist() == torch.bincount(topk_idx.flatten(), minlength=E).tolist()
    assert counts[1] == 0 and counts[4] == 0 and counts.sum() == T * K

    plan = dispatch(topk_idx, E)
    sorted_experts = topk_idx.flatten()[plan.order]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    # identity "experts" and unit weights: combine gives K copies of each token back
    x = torch.randn(T, D)
    back = combine(x[plan.token_idx], plan, torch.ones(T, K))
    torch.testing.assert_close(back, K * x)


def test_grouped_mm_jagged_blocks():
    counts = torch.tensor([3, 0, 4, 0, 1])
    x = torch.randn(int(counts.sum()), D)
    w = torch.randn(len(counts), D, 5)
    want = torch.cat([block @ w[g] for g, block in enumerate(x.split(counts.tolist()))])
    torch.testing.assert_close(grouped_mm(x, w, counts, backend="padded"), want)
    if grouped_mm_applies(x, w):
        torch.testing.assert_close(grouped_mm(x, w, counts, backend="grouped_mm"), want)
    with pytest.raises(ValueError, match="backend"):
        grouped_mm(x, w, counts, backend="nope")


def test_row_buckets_are_few_and_waste_at_most_an_eighth():
    sizes = [row_bucket(rows) for rows in range(8193)]
    assert sizes[0] == 0 and sizes[1] == sizes[32] == 32 and sizes[33] == 64 and sizes[257] == 288
    for rows, size in enumerate(sizes):
        assert rows <= size <= rows + max(31, rows // 8), rows
    assert len(set(sizes)) <= 50  # the kernels a step of any routing can meet, cached after the first steps


def test_bf16_expert_products_on_the_cpu_are_exact_with_padded_groups():
    """On the CPU in bf16 the groups are padded to their row bucket (oneDNN then meets a few recurring shapes):
    the products and all gradients are bit for bit those of the unpadded kernel, idle experts included."""
    counts = torch.tensor([10, 0, 100, 57, 133, 0])
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(counts), 64, 48, dtype=torch.bfloat16, requires_grad=True)
    if not grouped_mm_applies(x, w):
        pytest.skip("grouped_mm kernel not available on this torch build")
    grad_out = torch.randn(x.shape[0], 48, dtype=torch.bfloat16)
    padded = grouped_mm(x, w, counts)
    with force_moe_group_sizes("exact"):
        unpadded = grouped_mm(x, w, counts)
    assert torch.equal(padded, unpadded)
    for got, want in zip(torch.autograd.grad((padded * grad_out).sum(), (x, w)),
                         torch.autograd.grad((unpadded * grad_out).sum(), (x, w)), strict=True):
        assert torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's case: fp32 weights under autocast
        assert torch.equal(grouped_mm(x.float(), w.float(), counts), unpadded)


def test_compiled_bf16_expert_products_keep_the_padded_groups(monkeypatch):
    """Under torch.compile (the trainer's `--compile`) the CPU bf16 groups are still padded to their row buckets:
    the padding runs eagerly inside the compiled code, with the eager numbers."""
    import minillm.models.layers.moe as moe

    counts = torch.tensor([10, 0, 100, 57])
    x = torch.randn(int(counts.sum()), 64, dtype=torch.bfloat16)
    w = torch.randn(len(counts), 64, 48, dtype=torch.bfloat16)
    if not grouped_mm_applies(x, w):
        pytest.skip("grouped_mm kernel not available on this torch build")
    eager = grouped_mm(x, w, counts)
    kernel, group_ends = moe._GROUPED_MM, []

    def spy(a, b, offs):
        group_ends.append(offs.tolist())
        return kernel(a, b, offs=offs)

    monkeypatch.setattr(moe, "_GROUPED_MM", spy)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: grouped_mm(a, b, c) * 2, backend="eager")
    assert torch.equal(compiled(x, w, counts), eager * 2)
    assert group_ends == [[32, 32, 160, 224]]  # 10 -> 32, 0 -> 0, 100 -> 128, 57 -> 64 rows


def test_weight_layout_matches_transformers_experts():
    """Conversion to DeepseekV3 / Qwen3-Next experts must be a plain copy of gate_up_proj and down_proj."""
    config = DeepseekV3Config(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E)
    config._experts_implementation = "eager"
    ref = DeepseekV3Experts(config)
    ours = RoutedExperts(E, D, I)
    assert ref.gate_up_proj.shape == ours.gate_up_proj.shape and ref.down_proj.shape == ours.down_proj.shape
    with torch.no_grad():
        ref.gate_up_proj.copy_(ours.gate_up_proj)
        ref.down_proj.copy_(ours.down_proj)
    x = torch.randn(T, D)
    topk_idx, topk_weight = routing_with_idle_experts(2)
    torch.testing.assert_close(
        ours(x, topk_idx, topk_weight), ref(x, topk_idx, topk_weight), atol=1e-6, rtol=1e-5
    )


def test_expert_parallel_hook_replaces_local_compute():
    """`expert_parallel.compute(experts, x_sorted, counts)` is where the all-to-all runs; dispatch/combine stay local."""
    experts = RoutedExperts(E, D, I)
    x = torch.randn(T, D)
    topk_idx, topk_weight = routing_with_idle_experts(3)
    local = experts(x, topk_idx, topk_weight)
    calls = []

    class LoopbackParallel:
        def compute(self, module, x_sorted, counts):
            calls.append(counts.clone())
            return module.compute(x_sorted, counts)

    assert experts.expert_parallel is None
    experts.expert_parallel = LoopbackParallel()
    torch.testing.assert_close(experts(x, topk_idx, topk_weight), local)
    assert len(calls) == 1 and calls[0].tolist() == expert_counts(topk_idx, E).tolist()
