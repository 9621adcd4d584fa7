"""The models' decode fast path (`begin_decode` / `decode_step`, minillm/models/decode.py) against `forward`.

Step by step, the fast path's next-token logits must equal those of the ordinary cached forward (within 1e-5 of the
logits' scale: the same math, with some float32 sums in another order; Llama's is bit-identical) and
pick the same greedy tokens: one prompt, and a left-padded batch large enough that the MoE layers take their
grouped-matmul route instead of the gathered-weights one. Config variants cover the other code paths (DeepSeek
without a low-rank query, Qwen3-Next with as many key as value heads). Our engine uses the fast path and decodes
exactly what it decodes through `forward`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from inference_helpers import build_model, build_tokenizer, our_model_names

from minillm.inference.engine import Engine
from minillm.inference.sampling import SamplingParams

STEPS = 12


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) prompts right-aligned to the longest, and their (B, T) mask (1 = real token)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
        ids[row, : width - n] = 0
    return ids, mask


@torch.inference_mode()
def compare_with_forward(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Greedy-decode STEPS tokens twice, through `forward` with its cache and through the fast path, feeding both
    the tokens `forward` picks; assert the same greedy choices and return the largest logit difference, relative to
    the largest logit (float32 ops in a different order differ by a few ulps of the values they produce)."""
    batch, width = ids.shape
    padded = bool((mask == 0).any())
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos, use_cache=True)
    cache = out.cache
    state = model.begin_decode(copy.deepcopy(cache), width + STEPS, mask if padded else None)
    full_mask = torch.cat([mask, torch.ones(batch, STEPS, dtype=mask.dtype)], dim=1)
    tok, next_pos = out.logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1
    worst = 0.0
    for step in range(STEPS):
        step_mask = full_mask[:, : width + step + 1] if padded else None
        ref = model(input_ids=tok, attention_mask=step_mask, position_ids=next_pos, cache=cache, use_cache=True)
        ref_logits = ref.logits[:, -1]  # (B, V)
        fast_logits = model.decode_step(tok, next_pos, state)  # (B, V)
        assert fast_logits.shape == ref_logits.shape
        assert torch.equal(fast_logits.argmax(-1), ref_logits.argmax(-1))
        # relative to the logits' scale (the test weights give logits of magnitude ~10)
        scale = max(1.0, ref_logits.abs().max().item())
        worst = max(worst, (fast_logits - ref_logits).abs().max().item() / scale)
        tok, next_pos = ref_logits.argmax(-1, keepdim=True), next_pos + 1
    assert state.length == width + STEPS
    return worst


VARIANTS = [(name, {}) for name in our_model_names()] + [
    ("mini_deepseekv3", {"q_lora_rank": None}),
    ("mini_qwen3_next", {"linear_num_value_heads": 2}),
]


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=[f"{n}{'-' if o else ''}{'-'.join(o)}" for n, o in VARIANTS])
def test_decode_step_equals_cached_forward(name, overrides, tokenizer):
    from minillm.models.registry import build_model as build

    if overrides:
        torch.manual_seed(0)
        model = build(name, "tiny", vocab_size=len(tokenizer), max_position_embeddings=256, **overrides).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.2)
    else:
        model = build_model(name, len(tokenizer))
    vocab = len(tokenizer)
    assert compare_with_forward(model, *left_padded(vocab, [9])) <= 1e-5  # one row, no padding
    # five rows of different lengths: padding masks, and (5 x top-2 > 8 experts) the grouped-matmul MoE route
    assert compare_with_forward(model, *left_padded(vocab, [9, 4, 7, 1, 9], seed=1)) <= 1e-5


@pytest.mark.parametrize("name", our_model_names())
def test_decode_step_in_bfloat16(name, tokenizer):
    """In bf16 (GPU inference) the fast path keeps the modules' own rounding order (norms, gated norm)."""
    model = build_model(name, len(tokenizer)).to(torch.bfloat16)
    assert compare_with_forward(model, *left_padded(len(tokenizer), [9, 4, 7, 1, 9], seed=1)) <= 1e-2


@pytest.mark.parametrize("name", our_model_names())
def test_engine_fast_path_decodes_what_forward_decodes(name, tokenizer):
    model = build_model(name, len(tokenizer))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["The cat sat on", "Hello world"]]
    params = SamplingParams(max_new_tokens=10)
    fast, slow = Engine(model, tokenizer), Engine(model, tokenizer, fast_path=False)
    assert fast.fast_path and not slow.fast_path
    for engine in (fast, slow):
        engine.stop_token_ids = set()
    assert [c.token_ids for c in fast.generate(prompts, params)] == [c.token_ids for c in slow.generate(prompts, params)]
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.2)
    assert [c.token_ids for c in fast.generate(prompts, sampled)] == [
        c.token_ids for c in slow.generate(prompts, sampled)
    ]


def test_decode_state_refuses_to_overflow(tokenizer):
    model = build_model("mini_llama3", len(tokenizer))
    ids, mask = left_padded(len(tokenizer), [4])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        state = model.begin_decode(out.cache, 5)
        model.decode_step(ids[:, :1], torch.tensor([[4]]), state)
        with pytest.raises(ValueError, match="decode state full"):
            model.decode_step(ids[:, :1], torch.tensor([[5]]), state)


def test_engine_without_fast_path_uses_forward(tokenizer):
    """A model without `decode_step` (transformers' own Llama) decodes through `forward` and its cache."""
    model = build_model("llama-hf", len(tokenizer))
    engine = Engine(model, tokenizer)
    assert not engine.fast_path
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))[0]
    assert out.prompt_tokens == 3 and 1 <= out.completion_tokens <= 3


def test_decode_gathers_expert_weights_only_while_they_are_small():
    """A CPU decode step copies the chosen experts' weights only while that copy is small (the tiny presets); larger
    experts (the base presets) go through the sorted dispatch and grouped matmul, which read them in place. Both
    give the module's numbers."""
    from minillm.models import decode as fast
    from minillm.models.layers.moe import RoutedExperts

    torch.manual_seed(0)
    small, large = RoutedExperts(8, 64, 32), RoutedExperts(8, 768, 512)
    assert fast.use_small_experts(small, num_tokens=1, top_k=2)
    assert not fast.use_small_experts(small, num_tokens=8, top_k=2)  # more slots than experts
    assert not fast.use_small_experts(large, num_tokens=1, top_k=2)  # 9.4 MB of weights to copy
    x, idx, weight = torch.randn(1, 64), torch.tensor([[3, 5]]), torch.tensor([[0.7, 0.3]])
    with torch.no_grad():
        torch.testing.assert_close(fast.routed_experts_small(small, x, idx, weight), small(x, idx, weight))
