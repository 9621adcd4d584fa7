"""Our decode loop against `generate()` and against an uncached forward, on tiny random models.

Correctness under greedy decoding is exact: token for token the same as `model.generate()` and as recomputing the
whole sequence without a cache, for one prompt and for a left-padded batch of prompts of different lengths.
"""

from __future__ import annotations

import threading

import pytest
import torch
from inference_helpers import all_model_names, build_model, build_tokenizer

from minillm.inference.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Engine, HFEngine
from minillm.inference.sampling import SamplingParams, filter_top_k, filter_top_p, sample_next
from minillm.inference.textstream import IncrementalText

PROMPTS = [
    "The cat sat on the mat and",
    "Hello world",
    "A big red dog ran quickly under the green tree because",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module", params=all_model_names())
def model(request, tokenizer):
    return build_model(request.param, len(tokenizer))


def encode(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def no_stop(engine):
    """Random weights may emit eos early; compare full-length outputs."""
    engine.stop_token_ids = set()
    return engine


@torch.inference_mode()
def uncached_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    for _ in range(n):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]  # (1, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


def test_greedy_matches_generate_batch1_and_padded_batch(model, tokenizer):
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=12)
    ours_b = [c.token_ids for c in no_stop(Engine(model, tokenizer)).generate(prompts, params)]
    hf_b = [c.token_ids for c in no_stop(HFEngine(model, tokenizer)).generate(prompts, params)]
    assert ours_b == hf_b
    assert all(len(t) == 12 for t in ours_b)
    for p, batched in zip(prompts, ours_b, strict=True):
        solo = no_stop(Engine(model, tokenizer)).generate([p], params)[0].token_ids
        assert solo == batched  # left padding changes nothing
        assert solo == no_stop(HFEngine(model, tokenizer)).generate([p], params)[0].token_ids


def test_greedy_repetition_penalty_matches_generate(model, tokenizer):
    """Our penalty (divide positive logits, multiply negative ones, over prompt + generated tokens) is the one
    transformers' RepetitionPenaltyLogitsProcessor applies: greedy batch-1 outputs agree token for token."""
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.3)
    plain = SamplingParams(max_new_tokens=12)
    changed = False
    for prompt in encode(tokenizer, PROMPTS):
        ours = no_stop(Engine(model, tokenizer)).generate([prompt], params)[0].token_ids
        assert ours == no_stop(HFEngine(model, tokenizer)).generate([prompt], params)[0].token_ids
        changed |= ours != no_stop(Engine(model, tokenizer)).generate([prompt], plain)[0].token_ids
    assert changed  # the penalty really acted on at least one prompt


def test_overlapped_loop_gives_the_same_tokens_and_stops(model, tokenizer):
    """The CUDA schedule (next forward queued before the tokens are read) run on CPU: same results."""
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=8)
    plain = [c.token_ids for c in no_stop(Engine(model, tokenizer)).generate(prompts, params)]
    overlapped = no_stop(Engine(model, tokenizer, overlap=True))
    assert [c.token_ids for c in overlapped.generate(prompts, params)] == plain
    stop = plain[0][4]
    cut = overlapped.generate(prompts[:1], SamplingParams(max_new_tokens=8, stop_token_ids=[stop]))[0]
    assert cut.token_ids == plain[0][: plain[0].index(stop)] and cut.finish_reason == FINISH_STOP


def test_cached_equals_uncached(model, tokenizer):
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    ours = no_stop(Engine(model, tokenizer)).generate([prompt], SamplingParams(max_new_tokens=10))[0]
    assert ours.token_ids == uncached_greedy(model, prompt, 10)
    assert ours.finish_reason == FINISH_LENGTH


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tokenizer):
    engine = no_stop(Engine(model, tokenizer))
    prompts = encode(tokenizer, PROMPTS)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    first = [c.token_ids for c in engine.generate(prompts, params)]
    assert first == [c.token_ids for c in engine.generate(prompts, params)]
    other = SamplingParams(max_new_tokens=6, temperature=1.0, seed=8)
    assert first != [c.token_ids for c in engine.generate(prompts, other)]
    # row 0 of a batch uses the request's seed, so it matches the same prompt decoded alone
    assert first[0] == engine.generate(prompts[:1], params)[0].token_ids


def test_stop_token_and_stop_string(model, tokenizer):
    engine = no_stop(Engine(model, tokenizer))
    prompt = encode(tokenizer, PROMPTS[:1])
    full = engine.generate(prompt, SamplingParams(max_new_tokens=10))[0]
    # a stop token: generation ends before it, and it is not part of the output
    cut = engine.generate(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=[full.token_ids[3]]))[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[3])]
    assert cut.finish_reason == FINISH_STOP
    # a stop string taken from the middle of the text: the output is the text before it
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip(), "test needs a visible stop string"
    by_string = engine.generate(prompt, SamplingParams(max_new_tokens=10, stop=[stop]))[0]
    assert by_string.text == full.text[: full.text.index(stop)]
    assert by_string.finish_reason == FINISH_STOP


def test_max_new_tokens_is_cut_to_the_context_window(tokenizer):
    model = build_model("llama-hf", len(tokenizer), max_positions=40)
    engine = no_stop(Engine(model, tokenizer))
    prompt = encode(tokenizer, PROMPTS[2:])[0]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=100))[0]
    assert len(prompt) + len(out.token_ids) == 40 and out.finish_reason == FINISH_LENGTH
    with pytest.raises(ValueError, match="context window is 40"):
        engine.generate([prompt * 3], SamplingParams(max_new_tokens=1))


def test_cancel_stops_at_the_next_step(tokenizer):
    engine = no_stop(Engine(build_model("llama-hf", len(tokenizer)), tokenizer))
    cancel = threading.Event()
    steps = 0
    reasons = []
    for events in engine.stream(encode(tokenizer, PROMPTS[:1]), SamplingParams(max_new_tokens=50), cancel):
        steps += 1
        reasons += [ev.finish_reason for ev in events if ev.finish_reason]
        if steps == 3:
            cancel.set()
    assert steps == 4 and reasons == [FINISH_CANCELLED]


def test_hf_engine_sampling_and_stop_string(tokenizer):
    model = build_model("llama-hf", len(tokenizer))
    engine = no_stop(HFEngine(model, tokenizer))
    prompt = encode(tokenizer, PROMPTS[:1])
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)
    assert engine.generate(prompt, params)[0].token_ids == engine.generate(prompt, params)[0].token_ids
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(prompt, params)
    assert torch.equal(torch.rand(3), expected)  # a seeded request leaves the process-wide RNG as it found it
    full = engine.generate(prompt, SamplingParams(max_new_tokens=8))[0]
    stop = full.text[-3:-1]
    out = engine.generate(prompt, SamplingParams(max_new_tokens=8, stop=[stop]))[0]
    assert out.text == full.text[: full.text.index(stop)] and out.finish_reason == FINISH_STOP


def test_hf_engine_samples_the_whole_vocabulary_when_top_k_is_off(tokenizer):
    # generate() replaces a top_k of None with its default, 50: "off" must reach it as 0
    model = build_model("llama-hf", len(tokenizer))
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    params = SamplingParams(max_new_tokens=40, temperature=2.0, seed=3)
    generated = no_stop(HFEngine(model, tokenizer)).generate([prompt], params)[0].token_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]  # (40, V)
    chosen = logits.gather(1, torch.tensor(generated)[:, None])
    ranks = (logits > chosen).sum(dim=1)  # 0 = the most likely token
    assert len(tokenizer) > 100 and int(ranks.max()) >= 50


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    # probs ~ [0.09, 0.67, 0.24, 0.03]: top_p 0.7 keeps the two largest (0.67 alone does not reach 0.7)
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [[True, False, True, True]]
    # a p that rounds to 0 in fp32 still keeps the top token (it once dropped every token: a 500 from the server)
    assert torch.isinf(filter_top_p(logits, 1e-300)).tolist() == [[True, False, True, True]]
    assert sample_next(logits, SamplingParams(temperature=1.0, top_p=1e-300), None,
                       [torch.Generator().manual_seed(0)]).tolist() == [1]  # fmt: skip
    with pytest.raises(ValueError, match="repetition_penalty must be >= 0.01"):
        SamplingParams(repetition_penalty=1e-40)  # would divide the logits into infinities
    greedy = SamplingParams(repetition_penalty=4.0)
    seen = torch.tensor([[False, True, False, False]])
    assert sample_next(logits, greedy, seen).tolist() == [2]  # 3 / 4 < 2: the repeated token loses
    gen = [torch.Generator().manual_seed(0)]
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), None, gen).tolist() == [1]
    # a temperature too small to divide by decodes greedily (1e-40 would turn the logits into inf)
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=0.01).greedy
    assert sample_next(logits, SamplingParams(temperature=1e-40)).tolist() == [1]


def test_incremental_text_streams_exactly_the_decoded_text(tokenizer):
    text = "Hello wörld — naïve café 日本語 🙂 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tokenizer)
    pieces = [inc.feed(i) for i in ids] + [inc.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # with a stop string, nothing of it (not even its first characters) is ever streamed
    inc = IncrementalText(tokenizer, stop=["café"])
    streamed = "".join(inc.feed(i) for i in ids if not inc.stopped) + inc.flush()
    assert streamed == "Hello wörld — naïve " and inc.stopped
    # a reply cut by its token limit inside a multi-byte character ends at the last whole character
    cut = tokenizer("naïve 🙂", add_special_tokens=False)["input_ids"][:-1]
    assert tokenizer.decode(cut).endswith("\ufffd")  # the emoji's bytes span several tokens
    inc = IncrementalText(tokenizer)
    assert "".join(inc.feed(i) for i in cut) + inc.flush() == "naïve "


def test_bench_script_reports_both_engines(tokenizer):
    """scripts/bench_decode.py on a tiny model: every engine produces all tokens and gets timed."""
    import argparse
    import importlib.util
    from pathlib import Path

    from rich.table import Table

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(batch_sizes=[1, 2], prompt_len=5, new_tokens=4, repeats=1)
    rows = bench.bench_model(
        "llama-hf", build_model("llama-hf", len(tokenizer)), tokenizer, args, "cpu", Table()
    )
    assert [(r["batch"], r["engine"]) for r in rows] == [
        (1, "generate()"),
        (1, "minillm"),
        (2, "generate()"),
        (2, "minillm"),
    ]
    assert all(r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    # a model with a decode fast path is also timed through plain forward() (the before/after in one run)
    args.batch_sizes = [1]
    rows = bench.bench_model(
        "mini_llama3", build_model("mini_llama3", len(tokenizer)), tokenizer, args, "cpu", Table()
    )
    assert [r["engine"] for r in rows] == ["generate()", "minillm forward()", "minillm"]
    assert all(r["decode_tok_s"] > 0 for r in rows) and rows[0]["speedup_vs_generate"] == 1.0


def test_ids_past_the_tokenizer_are_never_generated(tokenizer, monkeypatch):
    """A head padded past the tokenizer's vocabulary (imported models round it up): its extra ids decode to nothing,
    so neither engine nor `eval chat`'s greedy answers may produce them. Here every real id's logit is 0 and the 16
    padded rows are random, so without the suppression greedy decoding picks a padded id at every step."""
    from minillm.evaluation import chat as eval_chat

    n = len(tokenizer)
    model = build_model("mini_llama3", n + 16)
    head = torch.zeros_like(model.lm_head.weight)  # its own weight: the tiny models tie it to the embedding
    head[n:] = torch.randn(16, head.shape[1]) * 10
    model.lm_head.weight = torch.nn.Parameter(head)
    prompts = encode(tokenizer, PROMPTS[:2])
    assert model(input_ids=torch.tensor(prompts[:1])).logits[0, -1].argmax() >= n  # the trap is set
    for engine in (Engine(model, tokenizer), HFEngine(model, tokenizer)):
        for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)):
            for completion in no_stop(engine).generate(prompts, params):
                assert len(completion.token_ids) == 6 and max(completion.token_ids) < n, engine.name
    produced = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: produced.append(out := real_generate(**kw)) or out)
    eval_chat.greedy_answers(model, tokenizer, prompts, 6, 2, torch.device("cpu"), progress=False)
    assert produced and int(produced[0][:, -6:].max()) < n
