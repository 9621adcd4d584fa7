"""mini_deepseekv3 against transformers' DeepseekV3ForCausalLM, and its MLA cache, MoE balancing and MTP."""

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
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import minillm  # noqa: F401  (registers the Auto classes)
from minillm.models.layers.moe import expert_counts
from minillm.models.mini_deepseekv3 import (
    PRESETS,
    MiniDeepSeekV3Config,
    MiniDeepSeekV3ForCausalLM,
    MLACache,
    from_reference,
    to_reference,
)
from minillm.models.mini_deepseekv3.modeling_mini_deepseekv3 import sequence_balance_loss
from minillm.models.registry import build_model

VOCAB = 256


def tiny(**overrides) -> MiniDeepSeekV3ForCausalLM:
    """1 dense + 1 MoE layer (8 experts in 4 groups, top-2 from the best 2 groups), peaked logits, fp32, eval."""
    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=2, initializer_range=0.1, loss_chunk_size=8)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = build_model("mini_deepseekv3", "tiny", **kwargs).eval()
    with torch.no_grad():  # a trained-looking balancing bias, so selection != weighting is exercised
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def moe_routers(model):
    return [layer.mlp.gate for layer in model.model.layers if layer.is_moe]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_hidden_layers=3),
        # plain q_proj, rotate-half RoPE, unnormalised scaled weights, attention biases, untied head, no groups
        dict(
            q_lora_rank=None,
            rope_interleave=False,
            norm_topk_prob=False,
            routed_scaling_factor=2.5,
            attention_bias=True,
            tie_word_embeddings=False,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=3,
        ),
        # YaRN tables sized by the RoPE part of a head (8 channels), not by hidden / heads (16), as the reference
        # sizes them; and no shared experts (the reference builds zero-width ones, which the copy skips)
        dict(
            qk_rope_head_dim=8,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
                mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1,
            ),
            n_shared_experts=0,
        ),
    ],
    ids=["default", "variant", "yarn_narrow_rope_no_shared"],
)
def test_parity_with_deepseek_v3(overrides):
    model = tiny(**overrides)
    ref = to_reference(model)
    assert isinstance(ref, DeepseekV3ForCausalLM)
    assert not any(name.startswith("mtp") for name in ref.state_dict())
    check_reference_parity(model, ref, VOCAB)
    check_roundtrip(model, to_reference, from_reference, skip=("mtp.",))


def test_from_reference_of_a_native_deepseek_v3():
    torch.manual_seed(1)
    config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        initializer_range=0.1,
        num_mtp_layers=0,
        rope_theta=10000.0,
    )
    ref = DeepseekV3ForCausalLM(config).eval()
    ours = from_reference(ref)
    assert ours.mtp is None and ours.config.num_dense_layers == 1
    check_reference_parity(ours, ref, VOCAB, gen_tokens=8)


def test_save_load_roundtrip(tmp_path):
    model = tiny()
    loaded = check_save_load(model, tmp_path)
    for a, b in zip(moe_routers(model), moe_routers(loaded), strict=True):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)  # the bias is saved
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_export_loads_in_plain_transformers(tmp_path):
    """The export (MTP dropped) matches in a process without minillm, and has no pad id: as the embedding's
    padding_idx it would freeze the eos (= pad) row when the export is fine-tuned with transformers."""
    dst = check_hf_export(tiny(), tmp_path, "DeepseekV3ForCausalLM", skip=("mtp.",))
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config.get("pad_token_id") is None
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["pad_token_id"] == 0


@pytest.mark.parametrize("batch", [1, 4])
def test_cached_generation_equals_full_recompute(batch):
    check_cached_generation(tiny(), VOCAB, batch=batch, new_tokens=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_cache_holds_only_latent_and_rope_key(dtype):
    model = tiny(num_hidden_layers=3).to(dtype)
    config = model.config
    prompt = random_ids(VOCAB, 2, 6)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert isinstance(cache, MLACache)  # generate() uses our cache
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype.itemsize
    assert cache.bytes_per_token() == expected
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 1, 8, config.kv_lora_rank)  # 6 prompt + 2 fed-back tokens
    assert layer.values.shape == (2, 1, 8, config.qk_rope_head_dim)
    total = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    assert total == expected * 2 * 8


@torch.no_grad()
def test_absorbed_decoding_matches_expanded_attention():
    """Cached steps attend over the latents with W_UK / W_UV absorbed; the logits equal a full forward."""
    model = tiny()
    ids = random_ids(VOCAB, 2, 12, seed=4)
    full = model(input_ids=ids).logits  # expanded keys/values everywhere
    prefix = model(input_ids=ids[:, :8], use_cache=True)
    step = model(input_ids=ids[:, 8:], cache=prefix.cache, use_cache=True)  # 4 queries, 12 cached latents
    torch.testing.assert_close(step.logits, full[:, 8:], atol=1e-5, rtol=1e-5)
    assert step.cache.get_seq_length() == 12


def test_packed_documents_including_mtp():
    model = tiny()
    check_packed_equivalence(model, VOCAB)
    lengths = (7, 12, 9)
    docs = [random_ids(VOCAB, 1, n, seed=30 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_mtp = model.mtp_logits(packed, position_ids=position_ids)
    start = 0
    for doc in docs:
        alone = model.mtp_logits(doc)
        diff = (packed_mtp[:, start : start + doc.shape[1]] - alone).abs().max().item()
        assert diff <= 1e-4, f"packed MTP logits differ by {diff}"
        start += doc.shape[1]
    # Training losses: summed (num_items_in_batch=1) packed MTP and balance terms equal the per-document ones.
    model.train()
    packed_out = model(input_ids=packed, position_ids=position_ids, labels=packed, num_items_in_batch=1)
    alone_out = [model(input_ids=d, labels=d, num_items_in_batch=1) for d in docs]
    for key in ("lm", "mtp"):
        per_doc = sum(o.aux_losses[key] for o in alone_out)
        assert torch.allclose(packed_out.aux_losses[key], per_doc, atol=1e-4), key
    # seq_aux is a mean over sequences: the packed row holds the same three sequences.
    per_doc_aux = sum(o.aux_losses["seq_aux"] for o in alone_out) / len(docs)
    assert torch.allclose(packed_out.aux_losses["seq_aux"], per_doc_aux, atol=1e-5)
    assert torch.equal(packed_out.expert_counts, sum(o.expert_counts for o in alone_out))


def test_the_padding_of_packed_rows_is_no_expert_load():
    """PackedCollator pads a short row with one more "document" of pad tokens: without its attention_mask (0 there)
    they were routed and counted (all one id, so all to the same experts: the bias update pushed against a load
    that was not there) and made one more sequence of the balance loss. The real tokens' loss is the same."""
    from minillm.data.collate import PackedCollator

    model = tiny().train()
    items = [{"input_ids": random_ids(VOCAB, 1, n, seed=n)[0], "labels": random_ids(VOCAB, 1, n, seed=n)[0],
              "position_ids": torch.arange(n)} for n in (40, 12)]  # fmt: skip
    batch = PackedCollator(pad_id=0)(items)
    out = model(**batch)
    top_k = model.config.num_experts_per_tok
    assert out.expert_counts.sum(-1).tolist() == [52 * top_k] * out.expert_counts.shape[0]  # real tokens only
    alone = [model(**PackedCollator(pad_id=0)([item])) for item in items]
    assert torch.equal(out.expert_counts, sum(o.expert_counts for o in alone))
    assert torch.allclose(out.aux_losses["seq_aux"], sum(o.aux_losses["seq_aux"] for o in alone) / 2, atol=1e-5)


def test_chunked_loss_and_gradients():
    check_chunked_loss(tiny(), VOCAB)


def test_training_losses_counts_and_gradients():
    model = tiny(num_hidden_layers=3, seq_aux_alpha=0.01, mtp_loss_lambda=0.3).train()
    config = model.config
    ids = random_ids(VOCAB, 2, 16)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    bias_before = [r.e_score_correction_bias.clone() for r in moe_routers(model)]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and set(out.aux_losses) == {"lm", "mtp", "seq_aux"}
    aux = out.aux_losses
    expected = aux["lm"] + config.mtp_loss_lambda * aux["mtp"] + config.seq_aux_alpha * aux["seq_aux"]
    assert torch.allclose(out.loss, expected, atol=1e-6)
    # 2 MoE layers; every real token (28 of 32) sends K=2 slots
    assert out.expert_counts.shape == (config.num_moe_layers, config.n_routed_experts) == (2, 8)
    assert out.expert_counts.dtype == torch.float32 and not out.expert_counts.requires_grad
    assert out.expert_counts.sum(-1).tolist() == [28 * 2, 28 * 2]
    out.loss.backward()
    assert model.mtp.eh_proj.weight.grad.abs().sum() > 0  # MTP trains
    assert all(
        r.weight.grad.abs().sum() > 0 for r in moe_routers(model)
    )  # routers learn through weights + aux
    for router, before in zip(moe_routers(model), bias_before, strict=True):
        assert torch.equal(router.e_score_correction_bias, before)  # forward never touches the bias
    # Eval mode: the LM loss only (MTP and balance terms are training-only).
    model.eval()
    eval_out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert set(eval_out.aux_losses) == {"lm"} and torch.allclose(eval_out.loss, aux["lm"], atol=1e-6)


def test_sequence_balance_loss_formula():
    torch.manual_seed(0)
    tokens, experts, k = 10, 4, 2
    scores = torch.rand(tokens, experts)
    topk_idx = scores.topk(k, dim=-1).indices
    segments = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 0, 1])  # token 7 is padding (bucket 2 = num_segments)
    got = sequence_balance_loss(scores, topk_idx, segments, num_segments=2)
    per_seq = []
    for s in range(2):
        sel = segments == s
        n = int(sel.sum())
        f = torch.bincount(topk_idx[sel].flatten(), minlength=experts).float() * experts / (k * n)
        p = (scores[sel] / scores[sel].sum(-1, keepdim=True)).mean(0)
        per_seq.append((f * p).sum())
    torch.testing.assert_close(got, torch.stack(per_seq).mean())
    # Unused segment ids (no tokens) are left out of the mean: the same loss with the ids spread out.
    spread = torch.where(segments == 2, 9, segments * 4)  # sequences 0 and 4 of 9, padding in bucket 9
    torch.testing.assert_close(sequence_balance_loss(scores, topk_idx, spread, num_segments=9), got)
    # Perfectly balanced routing with uniform scores gives exactly 1.
    uniform = torch.full((4, 4), 0.5)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    torch.testing.assert_close(
        sequence_balance_loss(uniform, balanced, torch.zeros(4, dtype=torch.long), 1), torch.tensor(1.0)
    )


def test_update_expert_bias_moves_load_toward_uniform():
    model = tiny(bias_update_speed=0.02)
    router = moe_routers(model)[0]
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.weight[0] += 0.5  # expert 0 attracts far more tokens than its share
    # The counts of a real forward (what the trainer sums) ...
    counts = model(input_ids=random_ids(VOCAB, 2, 32, seed=5)).expert_counts
    assert counts.shape == (1, 8) and counts.sum() == 2 * 32 * 2
    before = router.e_score_correction_bias.clone()
    model.update_expert_bias(counts)
    step = router.e_score_correction_bias - before
    load = counts[0]
    assert torch.all(step[load > load.mean()] == -0.02) and torch.all(step[load < load.mean()] == 0.02)
    assert torch.all(step[load == load.mean()] == 0)

    # ... then many steps on a fixed stream of hidden states through this router: the load evens out.
    hidden = torch.randn(512, model.config.hidden_size, generator=torch.Generator().manual_seed(6))

    def router_counts() -> torch.Tensor:
        with torch.no_grad():
            return expert_counts(router(hidden)[1], 8).float()[None]  # (1, E)

    router.e_score_correction_bias.zero_()
    start = router_counts()
    for _ in range(60):
        model.update_expert_bias(router_counts())
    end = router_counts()
    spread = lambda c: (c.max() / c.mean()).item()  # noqa: E731
    assert spread(start) > 1.5 and spread(end) < 1.2, f"max/mean load {spread(start):.2f} -> {spread(end):.2f}"
    with pytest.raises(ValueError, match="shape"):
        model.update_expert_bias(torch.zeros(3, 8))


def test_bias_stays_fp32_in_bf16_model():
    model = tiny()
    bias = moe_routers(model)[0].e_score_correction_bias.clone()
    model = model.to(torch.bfloat16)
    router = moe_routers(model)[0]
    assert router.e_score_correction_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
    assert torch.equal(router.e_score_correction_bias, bias)  # its fp32 values, not bf16's rounding of them
    out = model(input_ids=random_ids(VOCAB, 1, 8))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_bf16_export_keeps_the_fp32_router_tensors_exact():
    """Exporting a bf16 model used to round the tensors it keeps in fp32 (the router's weight and balancing bias,
    as the reference declares them): routing then differed on some tokens."""
    model = tiny().to(torch.bfloat16)
    with torch.no_grad():
        for router in moe_routers(model):
            router.weight.data = router.weight.data.float().normal_(0.0, 0.1)  # as from_pretrained keeps it
    ref = to_reference(model)
    ref_routers = [layer.mlp.gate for layer in ref.model.layers if hasattr(layer.mlp, "gate")]
    for ours, theirs in zip(moe_routers(model), ref_routers, strict=True):
        assert theirs.weight.dtype == torch.float32 and torch.equal(theirs.weight, ours.weight)
        assert torch.equal(theirs.e_score_correction_bias, ours.e_score_correction_bias)
    back = from_reference(ref)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(moe_routers(model), moe_routers(back), strict=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_routed_experts=6, n_group=4), "divisible by n_group"),
        (dict(num_experts_per_tok=9, n_group=1, topk_group=1), "exceeds n_routed_experts"),
        (dict(topk_group=5), "topk_group"),
        (dict(n_group=8, topk_group=4), "at least 2"),
        (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "allowed groups"),
        (dict(num_dense_layers=5, num_hidden_layers=4), "num_dense_layers"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(num_mtp_layers=2), "num_mtp_layers"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(seq_aux_alpha=-1.0), "seq_aux_alpha"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        MiniDeepSeekV3Config(**{**PRESETS["tiny"], **overrides})


def test_preset_sizes():
    tiny_model = build_model("mini_deepseekv3", "tiny")
    assert sum(p.numel() for p in tiny_model.parameters()) < 5_000_000
    assert tiny_model.config.vocab_size == 32004
    with torch.device("meta"):
        base = build_model("mini_deepseekv3", "base")
    total = sum(p.numel() for p in base.parameters())
    assert 100e6 <= total <= 200e6, total
    assert (base.config.hidden_size, base.config.num_hidden_layers, base.config.num_attention_heads) == (
        768,
        12,
        12,
    )


def test_a_row_of_padding_is_not_a_sequence_of_the_balance_loss():
    """The balance loss averages over the sequences that have tokens: a row that is all padding adds none (before,
    its empty segment was counted and halved the loss here)."""
    model = tiny().train()
    ids = random_ids(VOCAB, 1, 16, seed=3)
    alone = model(input_ids=ids, labels=ids).aux_losses["seq_aux"]
    padded = torch.cat([ids, torch.zeros_like(ids)])  # (2, 16): row 1 is padding only
    mask = torch.tensor([[1] * 16, [0] * 16])
    with_padding_row = model(input_ids=padded, attention_mask=mask, labels=padded).aux_losses["seq_aux"]
    torch.testing.assert_close(with_padding_row, alone)
