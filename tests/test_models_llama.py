"""mini_llama3 against transformers' LlamaForCausalLM, and the model contracts of docs/design.md."""

import pytest
import torch
from model_checks import (
    check_cached_generation,
    check_chunked_loss,
    check_packed_equivalence,
    check_reference_parity,
    check_roundtrip,
    check_save_load,
)
from transformers import LlamaForCausalLM

import minillm  # noqa: F401  (registers the Auto classes)
from minillm.models.mini_llama3 import MiniLlama3Config, MiniLlama3ForCausalLM, from_reference, to_reference
from minillm.models.registry import build_model

VOCAB = 256


def tiny(**overrides) -> MiniLlama3ForCausalLM:
    """A 2-layer GQA model (4 query heads, 2 kv heads) with peaked logits, fp32, eval mode."""
    kwargs = dict(vocab_size=VOCAB, num_hidden_layers=2, initializer_range=0.1, loss_chunk_size=8)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return build_model("mini_llama3", "tiny", **kwargs).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_parity_with_llama(tied):
    model = tiny(tie_word_embeddings=tied)
    ref = to_reference(model)
    assert isinstance(ref, LlamaForCausalLM)
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == tied
    check_reference_parity(model, ref, VOCAB)
    check_roundtrip(model, to_reference, from_reference)


def test_from_reference_of_a_native_llama():
    from transformers import LlamaConfig

    torch.manual_seed(1)
    ref = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_theta=10000.0,
            initializer_range=0.1,
        )
    ).eval()
    ours = from_reference(ref)
    assert ours.config.rope_parameters["rope_theta"] == 10000.0
    check_reference_parity(ours, ref, VOCAB)


def test_save_load_roundtrip(tmp_path):
    loaded = check_save_load(tiny(), tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survives the round trip


@pytest.mark.parametrize("batch", [1, 4])
def test_cached_generation_equals_full_recompute(batch):
    check_cached_generation(tiny(), VOCAB, batch=batch, new_tokens=32)


def test_generation_uses_the_cache():
    """Decoding one token with the cache of the prefix gives the logits of the full sequence; without the cache
    it does not (so a cache-ignoring model would be caught)."""
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[
            :, -1
        ]
        alone = model(input_ids=ids[:, -1:]).logits[:, -1]
    assert (step - full).abs().max() < 1e-5
    assert (alone - full).abs().max() > 1e-2


def test_packed_rows_do_not_mix_documents():
    check_packed_equivalence(tiny(), VOCAB)


def test_chunked_loss_matches_plain_cross_entropy():
    check_chunked_loss(tiny(tie_word_embeddings=False), VOCAB)
    check_chunked_loss(tiny(), VOCAB)  # tied: the head gradient lands on the embedding


def test_loss_returns_no_logits_and_logits_to_keep():
    model = tiny()
    ids = torch.randint(1, VOCAB, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and set(out.aux_losses) == {"lm"}
    assert model(input_ids=ids, logits_to_keep=1).logits.shape == (2, 1, VOCAB)


def test_padding_matches_unpadded():
    """Right padding (training) leaves the real tokens' logits unchanged."""
    model = tiny()
    ids = torch.randint(1, VOCAB, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=padded, attention_mask=mask).logits[:, :9]
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, num_attention_heads=8), "must divide hidden_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "must divide num_attention_heads"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
        (dict(attention_dropout=1.5), "attention_dropout"),
    ],
)
def test_bad_configs_fail_clearly(kwargs, message):
    base = dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=message):
        MiniLlama3Config(**{**base, **kwargs})


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused(rope_type):
    """transformers recomputes these tables from each forward's positions (past the original length they give
    other logits than fixed tables); minillm refuses them rather than compute something else."""
    rope = dict(rope_type=rope_type, rope_theta=10000.0, factor=2.0, original_max_position_embeddings=16)
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported"):
        build_model("mini_llama3", "tiny", hidden_size=64, num_attention_heads=4, rope_parameters=rope)


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny().train()
    ids = torch.randint(1, VOCAB, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    for g, p in zip(expected, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_loss_runs_inside_the_head_module():
    """ZeRO-3 / FSDP gather the head's sharded weight only around `lm_head`'s own forward: the loss must go
    through it (a forward pre-hook sees the call)."""
    model = tiny()
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    ids = torch.randint(1, VOCAB, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [3]  # (hidden, targets, num_items_in_batch)
