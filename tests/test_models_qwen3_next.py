"""mini_qwen3_next: parity with transformers' Qwen3NextForCausalLM, generation with a real hybrid cache (conv +
recurrent state, K/V), packed documents, the MoE outputs (router aux loss, expert counts), presets and config
validation."""

import json

import pytest
import torch
from model_checks import (
    check_cached_generation,
    check_chunked_loss,
    check_hf_export,
    check_packed_equivalence,
    check_reference_parity,
    check_roundtrip,
    check_save_load,
    random_ids,
)
from transformers import DynamicCache, Qwen3NextForCausalLM
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

from minillm.models.mini_qwen3_next import (
    PRESETS,
    MiniQwen3NextConfig,
    MiniQwen3NextForCausalLM,
    from_reference,
    to_reference,
)
from minillm.models.mini_qwen3_next.modeling_mini_qwen3_next import router_aux_loss

VOCAB = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_config(**overrides) -> MiniQwen3NextConfig:
    """4 layers (DeltaNet x3 + attention), MoE everywhere but layer 1; chunk 8 so prompts span several chunks."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_chunk_size=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1], initializer_range=0.1,
        loss_chunk_size=16,
    )
    kwargs.update(overrides)
    return MiniQwen3NextConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> MiniQwen3NextForCausalLM:
    torch.manual_seed(seed)
    model = MiniQwen3NextForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # move the zero-initialised norm offsets away from identity so their layout matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_reference_parity_and_roundtrip():
    ours = tiny_model(router_aux_loss_coef=0.0)
    ref = to_reference(ours)
    assert isinstance(ref, Qwen3NextForCausalLM)
    diffs = check_reference_parity(ours, ref, VOCAB)
    assert diffs["logits_max_abs_diff"] <= 1e-4
    check_roundtrip(ours, to_reference, from_reference)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=0, mlp_only_layers=[]),  # dense everywhere
        dict(
            layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
            decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False, linear_num_value_heads=2,
            tie_word_embeddings=True, linear_conv_kernel_dim=3,
        ),
    ],
)
@torch.no_grad()
def test_reference_parity_of_other_layouts(overrides):
    ours = tiny_model(seed=12, **overrides)
    ref = to_reference(ours).eval()
    ids = random_ids(VOCAB, 2, 19, seed=12)
    assert (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-4
    assert abs(ours(input_ids=ids, labels=ids).aux_losses["lm"] - ref(input_ids=ids, labels=ids).loss) <= 1e-5
    check_roundtrip(ours, to_reference, from_reference)


def test_gradients_match_reference():
    """Training gradients of every parameter equal the reference's: covers our hand-written backwards (the chunked
    delta rule's triangular inverse, the short conv) against transformers' plain autograd. Sequence 21 with chunk 8
    spans several chunks and a ragged tail."""
    ours = tiny_model(seed=3, router_aux_loss_coef=0.0).train()
    ref = to_reference(ours).train()
    ids = random_ids(VOCAB, 2, 21, seed=3)
    ours(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_grads[name].grad
        scale = max(expected.abs().max().item(), 1e-3)
        assert (p.grad - expected).abs().max().item() <= 1e-4 * scale, name


@torch.no_grad()
def test_loss_with_router_aux_and_padding_matches_reference():
    # Training mode: the balance loss joins the loss (no dropout in these models, so the numbers are deterministic).
    ours = tiny_model(router_aux_loss_coef=0.05).train()
    ref = to_reference(ours).train()
    ids = random_ids(VOCAB, 3, 19, seed=5)
    # Training batches are right-padded: padding never precedes a target.
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    mask[2, -7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref_out = ref(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert abs(out.loss.item() - ref_out.loss.item()) <= 1e-5
    assert abs(out.aux_losses["router_aux"].item() - ref_out.aux_loss.item()) <= 1e-5
    assert out.loss.item() == pytest.approx(out.aux_losses["lm"].item() + 0.05 * out.aux_losses["router_aux"].item())
    # Evaluation mode reports the LM loss alone (comparable perplexities).
    ours.eval()
    assert torch.equal(ours(input_ids=ids, attention_mask=mask, labels=labels).loss, out.aux_losses["lm"])
    # Generation batches are left-padded: the logits of real tokens match.
    left = torch.flip(mask, dims=[1])
    logits_diff = ours(input_ids=ids, attention_mask=left).logits - ref(input_ids=ids, attention_mask=left).logits
    assert logits_diff[left.bool()].abs().max() <= 1e-4


def test_cached_generation_batch_1_and_left_padded_batch_4():
    model = tiny_model(seed=1)
    check_cached_generation(model, VOCAB, batch=1)
    check_cached_generation(model, VOCAB, batch=4)


@torch.no_grad()
def test_left_padding_does_not_pollute_the_state():
    """Each row of a left-padded batch generates what it generates alone, unpadded (a stronger check than cached ==
    recompute, which would also agree if padding leaked into both)."""
    model = tiny_model(seed=2)
    lengths = [11, 7, 4]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 11 - n :] = random_ids(VOCAB, n, seed=30 + row)
        mask[row, 11 - n :] = 1
    kwargs = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[0], pad_token_id=0)
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, 11:]
    for row, n in enumerate(lengths):
        alone = model.generate(input_ids=ids[row : row + 1, 11 - n :], **kwargs)[:, n:]
        assert torch.equal(batch[row : row + 1], alone), row


@torch.no_grad()
def test_generate_uses_a_hybrid_cache():
    model = tiny_model(seed=3)
    ids = random_ids(VOCAB, 2, 9, seed=4)
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache
    assert [type(layer) for layer in cache.layers] == [LinearAttentionLayer] * 3 + [DynamicLayer]
    cfg = model.config
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * 16
    assert cache.layers[0].conv_states[0].shape == (2, conv_dim, cfg.linear_conv_kernel_dim)
    assert cache.layers[0].recurrent_states[0].shape == (2, 4, 16, 16)
    assert cache.layers[3].keys.shape == (2, 2, 9, 16)
    # One decoding step from the cache equals the last position of a full forward.
    nxt = random_ids(VOCAB, 2, 1, seed=6)
    step = model(input_ids=nxt, cache=cache, position_ids=torch.full((2, 1), 9)).logits[:, -1]
    full = model(input_ids=torch.cat([ids, nxt], dim=1)).logits[:, -1]
    assert (step - full).abs().max() <= 1e-4
    assert cache.get_seq_length() == 10


def test_packed_documents_do_not_see_each_other():
    # Document lengths put boundaries inside DeltaNet chunks (chunk 8) and within the conv window.
    model = tiny_model(seed=4, router_aux_loss_coef=0.0)
    check_packed_equivalence(model, VOCAB, doc_lengths=(7, 13, 10))
    check_packed_equivalence(model, VOCAB, doc_lengths=(2, 1, 17))


def test_chunked_loss_and_normaliser():
    check_chunked_loss(tiny_model(seed=5, router_aux_loss_coef=0.0), VOCAB)


def test_save_load_roundtrip(tmp_path):
    check_save_load(tiny_model(seed=6), tmp_path)


def test_training_step_outputs_and_gradients():
    model = tiny_model(seed=7).train()
    ids = random_ids(VOCAB, 2, 12, seed=7)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and set(out.aux_losses) == {"lm", "router_aux"}
    # Expert counts: one row per MoE layer (layer 1 is dense), top-k slots of every token.
    assert out.expert_counts.shape == (3, 4) and out.expert_counts.dtype == torch.float32
    assert torch.equal(out.expert_counts.sum(dim=1), torch.full((3,), 2.0 * 24))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Padding is excluded from the expert counts.
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    counted = model(input_ids=ids, attention_mask=mask, labels=ids).expert_counts
    assert torch.equal(counted.sum(dim=1), torch.full((3,), 2.0 * 19))


@torch.no_grad()
def test_router_aux_is_averaged_under_gradient_accumulation():
    """With an external normaliser N the balance term is weighted by this micro-batch's share of the N targets,
    so summing micro-batch losses averages it (as the LM term) instead of multiplying it."""
    model = tiny_model(seed=13, router_aux_loss_coef=0.5).train()
    ids = random_ids(VOCAB, 2, 15, seed=13)
    local = 2 * 14  # targets in this micro-batch
    mean = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(model(input_ids=ids, labels=ids, num_items_in_batch=local).loss, mean, atol=1e-6)
    assert torch.allclose(model(input_ids=ids, labels=ids, num_items_in_batch=2 * local).loss, mean / 2, atol=1e-6)


def test_router_aux_loss_pushes_toward_balance():
    """Gradient steps on the balance loss alone move a skewed router's expert load toward uniform (free router
    logits for 64 tokens, 4 experts, top-2, expert 0 preferred by every token)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 4, generator=gen) + torch.tensor([3.0, 1.0, 0.0, 0.0])).requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=20.0)

    def route():
        probs = torch.softmax(logits, dim=-1)
        return probs, probs.topk(2, dim=-1).indices

    def load() -> torch.Tensor:
        return torch.bincount(route()[1].reshape(-1), minlength=4).float()

    before = load()
    for _ in range(30):
        optimizer.zero_grad()
        router_aux_loss([route()], 4, None).backward()
        optimizer.step()
    after = load()
    assert before[0] == 64 and after.max() < 0.75 * before.max(), (before, after)
    assert after.std() < 0.5 * before.std(), (before, after)


def test_presets_parameter_counts():
    for preset, low, high in (("tiny", 0, 5e6), ("base", 100e6, 200e6)):
        config = MiniQwen3NextConfig(**PRESETS[preset])
        with torch.device("meta"):
            model = MiniQwen3NextForCausalLM(config)
        total = sum(p.numel() for p in model.parameters())
        assert low < total < high, (preset, total)
        assert config.vocab_size == 32004
    base = MiniQwen3NextConfig(**PRESETS["base"])
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert base.layer_types.count("full_attention") == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_types=["linear_attention", "mamba", "linear_attention", "full_attention"]), "unknown layer type"),
        (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries"),
        (dict(num_attention_heads=5, head_dim=None), "must divide hidden_size"),
        (dict(num_key_value_heads=3), "must divide num_attention_heads"),
        (dict(linear_num_key_heads=3), "must divide linear_num_value_heads"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(mlp_only_layers=[7]), "out of range"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_default_layer_pattern_is_three_to_one():
    config = tiny_config(num_hidden_layers=8, mlp_only_layers=[])
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]
    assert tiny_config(num_hidden_layers=6, full_attention_interval=2).layer_types.count("full_attention") == 3


def test_a_cache_without_state_layers_is_refused():
    model = tiny_model(seed=9)
    with pytest.raises(ValueError, match=r"DynamicCache\(config=model.config\)"):
        model(input_ids=random_ids(VOCAB, 1, 5), cache=DynamicCache())


def test_export_loads_in_plain_transformers(tmp_path):
    dst = check_hf_export(tiny_model(seed=10), tmp_path, "Qwen3NextForCausalLM")
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config.get("pad_token_id") is None


def test_bf16_autocast_training_step():
    """Under bf16 autocast the DeltaNet recurrence still runs in fp32 (no bf16 triangular solve), and the loss
    stays close to the fp32 one."""
    model = tiny_model(seed=11).train()
    ids = random_ids(VOCAB, 2, 20, seed=11)
    with torch.no_grad():
        fp32_loss = model(input_ids=ids, labels=ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert abs(out.loss.item() - fp32_loss) < 0.05 * fp32_loss
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_export_notes_a_model_without_full_attention(tmp_path):
    """transformers' Qwen3Next cache needs a full-attention layer: an all-DeltaNet export computes its logits there
    but cannot generate, which `minillm export` says instead of leaving the user to find out."""
    from minillm.models.export import export_to_hf
    from minillm.models.mini_qwen3_next import export_notes

    assert export_notes(tiny_config()) == []
    model = tiny_model(layer_types=["linear_attention"] * 4)
    model.save_pretrained(tmp_path / "src")
    summary = export_to_hf(tmp_path / "src", tmp_path / "dst")
    assert len(summary["notes"]) == 1 and "full-attention layer" in summary["notes"][0]
    ref = Qwen3NextForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(ref(input_ids=ids, use_cache=False).logits, model(input_ids=ids).logits)
