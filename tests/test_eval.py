"""Evaluation: perplexity / bits per byte and chat evaluation on a tiny random Llama with a tiny BPE tokenizer.

The model is a native `transformers.LlamaForCausalLM` saved to a directory, i.e. exactly what `minillm export`
produces, so these tests also show the evaluation works with any causal LM directory. Expected numbers are
computed independently here (a plain forward per document, a hand-written greedy loop).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli
from inference_helpers import byte_bpe_tokenizer

from minillm.errors import UserError
from minillm.evaluation import chat as chat_eval
from minillm.evaluation import evaluate_chat, evaluate_perplexity
from minillm.evaluation.perplexity import (
    document_windows,
    evaluate_token_windows,
    expand_data_paths,
    read_texts,
    token_byte_lengths,
)

WORDS = "the cat dog sat on a mat ran fast slow red blue green who wrote this poem li bai 猫 狗 你好 世界 天 地".split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]  # minillm's, same ids
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{%- else %}{{ m['content'] }}<|im_end|>{%- endif %}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build_tokenizer(vocab_size: int = 320):
    return byte_bpe_tokenizer(sentences(400, seed=1), vocab_size, SPECIAL, CHAT_TEMPLATE)


def build_model(tokenizer, uniform: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size, eos_id = len(tokenizer), tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # sharper, more varied predictions than the tiny init gives
        # only whole words (" cat") and the stop tokens can win an argmax, so greedy answers are words
        # that re-encode to the same few tokens, as a trained model's answers would
        for token_id in range(vocab_size):
            piece = tokenizer.decode([token_id])
            if token_id not in (eos_id, 2) and not (
                piece.startswith(" ") and piece.isascii() and piece.strip() in WORDS
            ):
                model.lm_head.weight[token_id] = 0.0
        if uniform:
            model.lm_head.weight.zero_()  # every logit 0: a uniform distribution over the vocabulary
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, model, tokenizer) of a random tiny Llama saved as an HF directory."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, model, tokenizer


def reference_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """NLL of every token of `text` after an eos, from one plain unbatched forward (no windows, no padding); text
    that spells a special token is text."""
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (L-1, V)
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item(), len(ids) - 1


# ---------------------------------------------------------------- perplexity


def test_bpb_matches_an_independent_computation(tiny):
    _, model, tokenizer = tiny
    texts = ["the cat sat on a mat", "你好 世界 li bai wrote this poem", "dog", "red blue green " * 5]
    texts[2] += f" and {tokenizer.eos_token} spelled out"  # scored as the characters, not as a document end
    result = evaluate_perplexity(model, tokenizer, texts, max_seq_len=128, batch_size=3, progress=False)

    nll, tokens = map(sum, zip(*(reference_nll(model, tokenizer, t) for t in texts), strict=True))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["tokens"] == tokens and result["bytes"] == n_bytes and result["documents"] == 4
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert 0 < result["bpb"] < 20


def test_long_documents_are_split_into_windows_that_score_every_token_once(tiny):
    _, model, tokenizer = tiny
    text = " ".join(sentences(6, seed=3))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = document_windows(ids, tokenizer.eos_token_id, max_seq_len=8)
    assert [t for _, tgt in windows for t in tgt] == ids  # every token a target exactly once, in order
    assert all(len(inp) <= 8 for inp, _ in windows)

    result = evaluate_perplexity(model, tokenizer, [text], max_seq_len=8, batch_size=4, progress=False)
    expected = 0.0
    for inputs, targets in windows:  # each window on its own, as an independent forward
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inputs])).logits[0].float()
        expected += F.cross_entropy(logits, torch.tensor(targets), reduction="sum").item()
    assert result["tokens"] == len(ids)
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    # less context per token than one long window: never better than scoring it whole
    whole = evaluate_perplexity(model, tokenizer, [text], max_seq_len=256, batch_size=1, progress=False)
    assert whole["tokens"] == result["tokens"] and whole["nll"] != pytest.approx(result["nll"], rel=1e-6)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tiny):
    _, _, tokenizer = tiny
    model = build_model(tokenizer, uniform=True)
    texts = sentences(5, seed=7)
    result = evaluate_perplexity(model, tokenizer, texts, max_seq_len=16, batch_size=2, progress=False)
    vocab = len(tokenizer)
    assert result["ppl"] == pytest.approx(vocab, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert result["bpb"] == pytest.approx(result["tokens"] * math.log2(vocab) / result["bytes"], rel=1e-6)


def test_token_windows_give_the_same_numbers_as_texts(tiny):
    """The trainer's path (token windows from shards) agrees with the text path; eos targets are not scored."""
    _, model, tokenizer = tiny
    texts = ["the cat sat on a mat", "你好 世界 猫", "li bai wrote this poem"]
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert sum(token_byte_lengths(tokenizer)[i] for i in encoded[1]) == len(texts[1].encode("utf-8"))
    by_text = evaluate_perplexity(model, tokenizer, texts, max_seq_len=64, batch_size=2, progress=False)
    by_window = evaluate_token_windows(model, tokenizer, [[eos, *ids] for ids in encoded], batch_size=2)
    for key in ("tokens", "bytes", "nll", "bpb"):
        assert by_window[key] == pytest.approx(by_text[key], rel=1e-5)
    # one packed window holding two documents: the eos between them is context, not a target
    packed = evaluate_token_windows(model, tokenizer, [[eos, *encoded[0], eos, *encoded[2]]])
    assert packed["tokens"] == len(encoded[0]) + len(encoded[2])
    assert packed["bytes"] == len(texts[0].encode()) + len(texts[2].encode())


def build_shards(tmp_path: Path, tokenizer_dir: Path, name: str) -> Path:
    from minillm.data.pretrain import build_pretrain_shards

    corpus = tmp_path / f"{name}.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in sentences(120, seed=21)), encoding="utf-8"
    )
    build_pretrain_shards([str(corpus)], tmp_path / name, tokenizer_dir, val_fraction=0.25, progress=False)
    return tmp_path / name


def test_shard_directory_val_split(tiny, tmp_path):
    """`--data DIR` scores every token of the val split of `minillm data pretrain` shards once: windows of
    max_seq_len + 1 tokens, each starting on the last token of the one before, the last partial one included
    (non-overlapping windows used to leave the first token of each and the split's tail unscored)."""
    import numpy as np

    from minillm.evaluation.perplexity import evaluate_files

    model_dir, model, tokenizer = tiny
    shards = build_shards(tmp_path, model_dir, "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    val = np.concatenate(
        [np.fromfile(shards / f["name"], dtype=manifest["dtype"]) for f in manifest["splits"]["val"]["files"]]
    ).tolist()
    windows = [val[i : i + 17] for i in range(0, len(val) - 1, 16)]
    assert len(windows[-1]) < 17  # this split ends in a partial window
    report = evaluate_files(model, tokenizer, [shards], max_seq_len=16, batch_size=4, progress=False)
    expected = evaluate_token_windows(model, tokenizer, windows, batch_size=3)
    row = report["files"][0]
    assert row["file"].endswith("shards:val") and row["documents"] == manifest["splits"]["val"]["documents"]
    for key in ("tokens", "bytes", "nll", "bpb"):
        assert row[key] == pytest.approx(expected[key], rel=1e-5)
    specials = set(tokenizer.all_special_ids)
    assert row["tokens"] == sum(t not in specials for w in windows for t in w[1:])
    assert row["tokens"] == sum(t not in specials for t in val[1:])  # all of them, once

    other = build_tokenizer(vocab_size=330)  # a different vocabulary: its shards must be refused
    other_dir = tmp_path / "other_tok"
    other.save_pretrained(other_dir)
    with pytest.raises(UserError, match="tokenizer"):
        evaluate_files(model, tokenizer, [build_shards(tmp_path, other_dir, "other")], progress=False)


@pytest.mark.parametrize("name", ["mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_our_architectures_load_from_a_directory_and_score_like_unpadded_windows(tiny, tmp_path, name):
    """Our models, saved and loaded back through the Auto classes: batched, right-padded scoring equals one plain
    forward per window (so their attention masks handle padding)."""
    from minillm.evaluation.loading import load_model_and_tokenizer
    from minillm.models.registry import build_model as build_ours

    _, _, tokenizer = tiny
    build_ours(name, "tiny", vocab_size=len(tokenizer)).save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    model, loaded_tokenizer = load_model_and_tokenizer(tmp_path / name, torch.device("cpu"), torch.float32)
    assert model.config.model_type == name and len(loaded_tokenizer) == len(tokenizer)

    texts = sentences(3, seed=2)  # of different lengths: the batch pads
    result = evaluate_perplexity(model, tokenizer, texts, max_seq_len=32, batch_size=3, progress=False)
    expected = 0.0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for inputs, targets in document_windows(ids, tokenizer.eos_token_id, 32):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([inputs])).logits[0].float()  # (L, V)
            expected += F.cross_entropy(logits, torch.tensor(targets), reduction="sum").item()
    assert result["nll"] == pytest.approx(expected, rel=1e-4)


def test_read_texts_formats_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minillm.data.sources import Source, iter_text_batches

    # a .txt file is cut into documents at blank lines, as `minillm data pretrain` cuts training text
    text = "\ufeffa first\ndocument\n\n   \n  an indented second\n\n\nthird\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["a first\ndocument", "  an indented second", "third"]
    assert read_texts(tmp_path / "a.txt") == [d for b in iter_text_batches(Source("txt", str(tmp_path / "a.txt")))
                                              for d in b]  # fmt: skip
    (tmp_path / "A.TXT").write_text(text, encoding="utf-8")  # a suffix in capitals is the same file type
    (upper,) = expand_data_paths([tmp_path / "A.TXT"])
    assert read_texts(upper) == read_texts(tmp_path / "a.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": ""}\n{"text": "  "}\n{"text": "y"}\n', encoding="utf-8")
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "b.json").write_text('[{"text": "x"}, {"text": "y"}]', encoding="utf-8")
    assert read_texts(tmp_path / "b.json") == ["x", "y"]
    pq.write_table(pa.table({"content": ["p", "q", "r"]}), tmp_path / "c.parquet")
    assert read_texts(tmp_path / "c.parquet", "content", limit=2) == ["p", "q"]
    with pytest.raises(UserError, match=r"c.parquet: no column 'text'"):
        read_texts(tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl:2: "):
        read_texts(tmp_path / "d.jsonl")


# ---------------------------------------------------------------- chat


def hand_greedy(model, tokenizer, messages, max_new_tokens: int) -> str:
    """Greedy decoding by hand: argmax of a full forward at every step, stop at <|im_end|> or eos."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    ids = list(ids["input_ids"])
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt in stops:
            break
        new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_chat_loss_is_on_assistant_tokens_only(tiny):
    _, model, tokenizer = tiny
    conversation = [
        {"role": "system", "content": "you are a cat"},
        {"role": "user", "content": "who wrote this poem"},
        {"role": "assistant", "content": "li bai"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "sat on a mat"},
    ]
    result = evaluate_chat(
        model, tokenizer, [conversation], max_seq_len=256, max_new_tokens=4, progress=False
    )

    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    scored = [ids[t] for t in range(1, len(ids)) if mask[t]]
    expected_tokens = len(
        tokenizer("li bai<|im_end|>sat on a mat<|im_end|>", add_special_tokens=False)["input_ids"]
    )
    assert len(scored) == expected_tokens == result["assistant_tokens"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # (L-1, V)
    expected = -sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == pytest.approx(expected / expected_tokens, rel=1e-5)


def test_exact_match_counts_greedy_answers(tiny):
    _, model, tokenizer = tiny
    questions = ["who wrote this poem", "the cat", "你好", "red blue", "dog ran"]
    predictions = [hand_greedy(model, tokenizer, [{"role": "user", "content": q}], 6) for q in questions]
    references = list(predictions)
    references[1] = predictions[1].strip()  # the model's leading space is normalised away: still a match
    references[2] = "mat"  # a wrong answer
    assert predictions[2].strip() != "mat"
    references[4] = "li bai wrote this poem " * 4  # too long for exact match: loss only
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        for q, r in zip(questions, references, strict=True)
    ]
    result = evaluate_chat(
        model, tokenizer, conversations, max_seq_len=256, batch_size=2, max_new_tokens=6, progress=False
    )
    em = result["exact_match"]
    assert [a["prediction"] for a in em["answers"]] == predictions[:4]
    assert [a["match"] for a in em["answers"]] == [True, True, False, True]
    assert (em["items"], em["correct"]) == (4, 3) and em["rate"] == pytest.approx(0.75)
    assert result["conversations"] == 5


def test_a_reasoning_models_answer_is_matched_after_its_reasoning():
    """A reasoning model writes `<think>...</think>` before its answer: the prediction is the answer (decoded
    without special tokens, the thoughts once stayed in it without their tags, so no answer matched), and a turn
    counts as short by its reasoning and answer together (the answer alone let cut-off answers in)."""
    from minillm.tokenizer import CHAT_TEMPLATE as REASONING_TEMPLATE

    tokenizer = byte_bpe_tokenizer(sentences(400, seed=1), 320, SPECIAL, REASONING_TEMPLATE)
    model = build_model(tokenizer)
    written = tokenizer("<think>\nthe cat sat\n</think>\n\nli bai<|im_end|>", add_special_tokens=False)["input_ids"]

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):  # the model "writes" `written`
        new = torch.tensor(written[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)

    model.generate = generate
    conversations = [[{"role": "user", "content": "who wrote this poem"},
                      {"role": "assistant", "content": "li bai", "reasoning_content": reasoning}]
                     for reasoning in ("the cat sat", "the cat sat on a mat " * 5)]  # fmt: skip
    assert len(written) <= 16
    result = evaluate_chat(model, tokenizer, conversations, max_seq_len=256, max_new_tokens=16, progress=False)
    em = result["exact_match"]
    assert em["items"] == 1 and em["correct"] == 1  # the second one's reasoning alone is longer than 16 tokens
    assert em["answers"][0]["prediction"] == "li bai"


def test_answers_cut_off_by_the_window_are_named_as_such(tiny):
    """Every answer beyond --max-seq-len: the error said there was no assistant turn, though there were."""
    _, model, tokenizer = tiny
    conversation = [{"role": "user", "content": "who wrote this poem " * 8}, {"role": "assistant", "content": "li bai"}]
    with pytest.raises(UserError, match="1 conversation\\(s\\) cut at --max-seq-len 8 tokens before their answers"):
        evaluate_chat(model, tokenizer, [conversation], max_seq_len=8, progress=False)


def test_chat_template_without_generation_markers_is_refused(tiny):
    _, model, tokenizer = tiny
    plain = build_tokenizer()
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    conversation = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "dog"}]
    with pytest.raises(UserError, match="generation"):
        evaluate_chat(model, plain, [conversation], progress=False)


def test_read_conversations_reads_what_data_sft_reads(tmp_path):
    """The three formats `data sft` takes; the rows it skips (bad JSON, no assistant turn, a turn that spells a
    special token, which the template would turn into a control token) are skipped and counted here too."""
    from minillm.data.sft import parse_conversation

    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhello"}]},
        {"conversations": [{"from": "human", "value": "who wrote it"}, {"from": "gpt", "value": "li bai"}]},
        {"instruction": "name a cat", "input": "", "output": "tom"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y<|im_end|>z"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n", encoding="utf-8")
    conversations, invalid = chat_eval.read_conversations(path)
    assert conversations == [parse_conversation(r) for r in rows[:3]]
    assert conversations[0][1]["content"] == "hello"  # leading blank lines dropped, as in training
    assert invalid["invalid_rows"] == 3
    assert [reason.split(": ", 1)[0] for reason in invalid["first_invalid"]] == [f"{path}:{n}" for n in (4, 5, 6)]
    assert "spells the special token <|im_end|>" in invalid["first_invalid"][1]
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps(rows[3]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no conversation with an assistant turn in the file \(first: .*bad.jsonl:1"):
        chat_eval.read_conversations(only_bad)
    (tmp_path / "x.csv").write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        chat_eval.read_conversations(tmp_path / "x.csv")
    assert chat_eval.normalize_answer("  Li   BAI。") == "li bai"


# ---------------------------------------------------------------- CLI


def test_cli_ppl_prints_table_and_writes_json(tiny, tmp_path, capsys):
    model_dir, model, tokenizer = tiny
    data = tmp_path / "heldout.jsonl"
    texts = sentences(6, seed=11)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out" / "ppl.json"
    code = run_cli(*[
            "eval",
            "ppl",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--data",
            str(data),
            "--json",
            str(out),
            "--max-seq-len",
            "16",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "bpb" in captured.out and captured.err == ""  # no progress bar (nor its empty line) off a terminal
    report = json.loads(out.read_text())
    expected = evaluate_perplexity(model, tokenizer, texts, max_seq_len=16, batch_size=4, progress=False)
    assert len(report["files"]) == 2 and report["total"]["documents"] == 12
    assert report["files"][0]["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)
    assert report["total"]["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)  # same file twice: same ratio
    assert not list(out.parent.glob(".*tmp"))


@pytest.mark.parametrize("place", ["run final", "run checkpoint", "outside a run", "given"])
def test_cli_ppl_windows_default_to_the_trained_length(tiny, tmp_path, place, capsys):
    """A model of a run is scored in windows as long as its run's rows (positions past them were never learned;
    README: 0.3 nats worse at 1,024 than at the 256 a small model was trained at); a model outside a run in windows
    of its maximum (256 here); --max-seq-len always wins."""
    import shutil

    model_dir, _, _ = tiny
    run_dir = tmp_path / "run"
    where = {"run final": run_dir / "final", "run checkpoint": run_dir / "checkpoints" / "step_00000010",
             "outside a run": tmp_path / "exported", "given": run_dir / "final"}[place]
    shutil.copytree(model_dir, where)
    (run_dir / "config.yaml").parent.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text("stage: pretrain\nseq_len: 24\n")
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(3, seed=5)), encoding="utf-8")
    given = ["--max-seq-len", "40"] if place == "given" else []
    out = tmp_path / "ppl.json"
    assert run_cli("eval", "ppl", "--model", str(where), "--data", str(data), "--json", str(out), *given) == 0
    expected = {"run final": 24, "run checkpoint": 24, "outside a run": 256, "given": 40}[place]
    assert json.loads(out.read_text())["max_seq_len"] == expected
    assert f"windows of {expected} tokens" in capsys.readouterr().out


def test_trained_seq_len_reads_the_run_config(tmp_path):
    from minillm.runs import trained_seq_len

    (tmp_path / "final").mkdir()
    assert trained_seq_len(tmp_path / "final") is None  # no config.yaml
    for text, expected in (("stage: pretrain\nseq_len: 512\n", 512), ("stage: pretrain\nseq_len: true\n", None),
                           ("seq_len: 512\n", None), ("[1, 2\n", None), ("", None), ("- 1\n", None)):
        (tmp_path / "config.yaml").write_text(text)  # only a run's config (it names the stage) is read
        assert trained_seq_len(tmp_path / "final") == expected
    (tmp_path / "config.yaml").write_text("stage: pretrain\nseq_len: 512\n")
    assert trained_seq_len(tmp_path) == 512  # a run directory: its final model
    assert trained_seq_len(tmp_path / "elsewhere") is None


def test_an_sft_model_is_scored_like_the_model_it_started_from(tmp_path):
    """Its SFT rows (often padded chats) do not say which positions it learned; its base run does, and base and
    fine-tuned perplexities are then measured in the same windows."""
    from minillm.runs import trained_seq_len

    for name, text in (("base", "stage: pretrain\nseq_len: 256\n"),
                       ("sft", f"stage: sft\nseq_len: 1024\nmodel_path: {tmp_path / 'base' / 'final'}\n"),
                       ("sft2", f"stage: sft\nseq_len: 512\nmodel_path: {tmp_path / 'sft'}\n"),
                       ("sft_of_export", f"stage: sft\nseq_len: 512\nmodel_path: {tmp_path / 'exported'}\n"),
                       ("loop", f"stage: sft\nseq_len: 512\nmodel_path: {tmp_path / 'loop'}\n"),
                       # recorded by older runs relative to the directory SFT ran in (the one above runs/)
                       ("runs/sft_relative", "stage: sft\nseq_len: 512\nmodel_path: runs/base_run/final\n"),
                       ("runs/base_run", "stage: pretrain\nseq_len: 128\n")):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(text)
    assert trained_seq_len(tmp_path / "runs" / "sft_relative" / "final") == 128
    assert trained_seq_len(tmp_path / "sft" / "final") == 256
    assert trained_seq_len(tmp_path / "sft2" / "final") == 256  # SFT of an SFT model
    assert trained_seq_len(tmp_path / "sft_of_export" / "final") is None  # the model's maximum, as before
    assert trained_seq_len(tmp_path / "loop" / "final") is None  # a config naming its own run ends


def test_cli_chat_writes_json(tiny, tmp_path):
    model_dir, _, _ = tiny
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "li bai"}]}
        for q in ("who wrote this poem", "the cat")
    ]
    rows.append({"messages": [{"role": "user", "content": "a question nobody answered"}]})  # skipped, counted
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "chat.json"
    code = run_cli(*[
            "eval",
            "chat",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--json",
            str(out),
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["exact_match"]["items"] == 2 and report["conversations"] == 2
    assert report["assistant_tokens"] > 0 and math.isfinite(report["loss"])
    assert report["invalid_rows"] == 1 and report["first_invalid"] == [f"{data}:3: no assistant turn"]


def test_cli_json_never_replaces_an_input_or_an_existing_file_unasked(tiny, tmp_path, capsys):
    model_dir, _, _ = tiny
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n", encoding="utf-8")
    before = data.read_text()
    old = tmp_path / "old.json"
    old.write_text("{}")
    common = ["eval", "ppl", "--model", str(model_dir), "--data", str(data), "--max-seq-len", "16",
              "--device", "cpu"]
    cases = {  # --json: what the one-line error says (all before any evaluation runs)
        str(data): "is an input",
        str(old): "already exists",
        str(tmp_path / "heldout.jsonl" / "r.json"): "is a file",
        str(tmp_path): "is a directory",
    }
    for json_out, message in cases.items():
        assert run_cli(*common, "--json", json_out) == 2, json_out
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert run_cli(*common, "--json", json_out, "--overwrite") == (0 if json_out == str(old) else 2)
        capsys.readouterr()
    assert data.read_text() == before
    assert json.loads(old.read_text())["total"]["documents"] == 1  # --overwrite replaced it
    # nor a file inside an input directory, even with --overwrite: the model's config.json stays the model's
    config_before = (model_dir / "config.json").read_text()
    assert run_cli(*common, "--json", str(model_dir / "config.json"), "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert f"is inside {model_dir}, an input of this command" in err and "\n" not in err, err
    assert (model_dir / "config.json").read_text() == config_before


def test_model_dir_resolution(tiny, tmp_path, monkeypatch):
    from minillm.runs import resolve_model_dir

    model_dir, _, _ = tiny
    run = tmp_path / "runs" / "pretrain_mini_llama3_20260101-000000"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text((model_dir / "config.json").read_text())
    assert resolve_model_dir(model_dir) == model_dir
    assert resolve_model_dir(run) == run / "final"  # a run directory means its finished model
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(None) == Path("runs") / run.name / "final"  # the newest finished run
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(UserError, match="no trained model found"):
        resolve_model_dir(None)


@pytest.mark.parametrize("case", ["missing_data", "not_a_model", "too_long"])
def test_cli_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, case):
    model_dir, _, _ = tiny
    data = tmp_path / "d.txt"
    data.write_text("the cat sat", encoding="utf-8")
    args = {
        "missing_data": ["--model", str(model_dir), "--data", str(tmp_path / "nope.parquet")],
        "not_a_model": ["--model", str(tmp_path), "--data", str(data)],
        "too_long": ["--model", str(model_dir), "--data", str(data), "--max-seq-len", "4096"],
    }[case]
    out = tmp_path / "r.json"
    assert run_cli(*["eval", "ppl", *args, "--json", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"missing_data": "nope.parquet", "not_a_model": "not a model directory", "too_long": "4096"}[
        case
    ] in err
    assert not out.exists()


def test_a_model_directory_without_its_tokenizer_is_named_as_such(tiny, tmp_path, capsys):
    """A model saved without tokenizer files gets an empty tokenizer from AutoTokenizer, which scored every text as
    empty ("no text to score"); and a tokenizer larger than the model's vocabulary is not the model's. (A Llama
    directory without them fails to load a tokenizer at all, said as such.)"""
    _, model, tokenizer = tiny
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n", encoding="utf-8")
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    bare = tmp_path / "bare"  # weights and config, no tokenizer files: a GPT-2 gets an empty GPT2Tokenizer
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(bare)
    assert run_cli("eval", "ppl", "--model", str(bare), "--data", str(data), "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "its tokenizer turns text into no tokens" in err, err
    small = tmp_path / "small"
    config = model.config.__class__(**{**model.config.to_dict(), "vocab_size": len(tokenizer) - 8})
    LlamaForCausalLM(config).save_pretrained(small)
    tokenizer.save_pretrained(small)
    assert run_cli("eval", "ppl", "--model", str(small), "--data", str(data), "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the tokenizer has {len(tokenizer)} tokens but the model only {len(tokenizer) - 8}" in err, err
