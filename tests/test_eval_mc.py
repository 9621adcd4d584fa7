"""`minillm eval mc`: multiple-choice accuracy by log-likelihood, on tiny models and question files built here.

Expected scores are computed independently: one plain unpadded forward per (question, choice), prompts written
out by hand. The end-to-end test trains a tiny Llama for a second on "the answer repeats the question's last word"
and checks it beats chance by a wide margin while the same model untrained does not.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from cli_helpers import run_cli, run_cli_err
from inference_helpers import byte_bpe_tokenizer

from minillm.errors import UserError
from minillm.evaluation.multiple_choice import Question, evaluate_multiple_choice, load_questions

WORDS = "cat dog sun moon tree fish bird rock star rain snow wind lake hill road ship".split()
EXTRA = "the red blue green 猫 狗 你好 世界 天 地 capital of france paris".split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def copy_corpus(n: int, seed: int) -> list[str]:
    """Training text whose answer always repeats the question's last word."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        out.append(f"Question: {' '.join(words)}\nAnswer: {words[-1]}")
    return out


def copy_questions(n: int, seed: int) -> list[dict]:
    """C-Eval-style rows: the right choice is the question's last word, the others are not in the question."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 6)
        choices = [words[2], *words[3:]]
        rng.shuffle(choices)
        rows.append(
            {
                "subject": ("animals", "weather")[i % 2],
                "question": " ".join(words[:3]),
                **dict(zip("ABCD", choices, strict=True)),
                "answer": "ABCD"[choices.index(words[2])],
            }
        )
    return rows


def build_tokenizer():
    return byte_bpe_tokenizer(copy_corpus(300, seed=1) + [" ".join(EXTRA)] * 3, 400, SPECIAL, CHAT_TEMPLATE)


def build_llama(tokenizer, sharpen: float = 1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # > 1: more varied log-probabilities than the tiny init gives
    return model.eval()


def train_copy(model, tokenizer, steps: int = 60, batch: int = 32) -> None:
    """A second of AdamW on the answer tokens of `copy_corpus`: enough to learn to repeat the last word."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    eos = tokenizer.eos_token_id
    for step in range(steps):
        rows, labels = [], []
        for text in copy_corpus(batch, seed=100 + step):
            context, answer = text.rsplit(" ", 1)
            ctx = [eos, *tokenizer(context, add_special_tokens=False)["input_ids"]]
            ids = [eos, *tokenizer(f"{context} {answer}", add_special_tokens=False)["input_ids"]]
            rows.append(ids)
            labels.append([-100] * len(ctx) + ids[len(ctx) :])
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        loss = model(input_ids=input_ids, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory):
    """{"random": dir, "trained": dir}: the same tiny Llama before and after learning the copy pattern."""
    dirs = {}
    model = build_llama(tokenizer)
    for name in ("random", "trained"):
        if name == "trained":
            train_copy(model, tokenizer)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, columns=("subject", "question", "A", "B", "C", "D", "answer")):
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- the independent reference


def naive_loglikelihood(model, tokenizer, context: str, continuation: str, prefix, max_len=None) -> float:
    """log P(continuation | context) from one unpadded forward; the pair is tokenized jointly, like lm-eval."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = prefix + tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = prefix + tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    n = len(whole) - len(ctx)
    inputs = whole[:-1][-max_len:] if max_len else whole[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0].float()  # (L, V)
    logprobs = torch.log_softmax(logits, dim=-1)[-n:]  # (n, V): the positions that predict the continuation
    return logprobs.gather(-1, torch.tensor(whole[-n:]).unsqueeze(-1)).sum().item()


def naive_scores(model, tokenizer, questions, style="cloze", chat=False, shots=(), max_len=None):
    """Per question, each choice's log-likelihood with prompts written out here (not by the module)."""

    def body(q):
        if style == "letters":
            return q.question + "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(q.choices))
        return q.question

    def target(q, i):
        return "ABCD"[i] if style == "letters" else q.choices[i]

    out = []
    for q in questions:
        if chat:
            messages = []
            for s in shots:
                messages += [
                    {"role": "user", "content": body(s)},
                    {"role": "assistant", "content": target(s, s.answer)},
                ]
            messages.append({"role": "user", "content": body(q)})
            context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prefix, delimiter = [], ""
        else:
            context = "".join(f"Question: {body(s)}\nAnswer: {target(s, s.answer)}\n\n" for s in shots)
            context += f"Question: {body(q)}\nAnswer:"
            prefix, delimiter = [tokenizer.eos_token_id], " "
        out.append(
            [
                naive_loglikelihood(model, tokenizer, context, delimiter + target(q, i), prefix, max_len)
                for i in range(len(q.choices))
            ]
        )
    return out


def accuracy(questions, scores, lengths) -> float:
    right = 0
    for q, lls in zip(questions, scores, strict=True):
        normed = [ll / max(lengths(c), 1) for ll, c in zip(lls, q.choices, strict=True)]
        right += max(range(len(normed)), key=lambda i: (normed[i], -i)) == q.answer
    return right / len(questions)


MIXED = [  # choices of very different lengths and scripts, so acc, acc_norm and acc_bytes can disagree
    Question("capital of france", ["paris", "the red moon", "猫", "blue"], 0, "geo"),
    Question("你好 世界", ["天 地", "dog", "世界 你好 天", "green fish"], 2, "zh"),
    Question("cat dog", ["dog", "cat", "star"], 1, "geo"),
    Question("the sun", ["sun", "moon rain snow wind", "天", "lake hill", "road"], 4, "zh"),
    Question("rock star", ["rock", "猫 狗", "the", "star"], 3, "geo"),
    Question("red blue green", ["red", "blue green", "狗", "ship"], 1, "zh"),
]


# ---------------------------------------------------------------- 1. scores equal a naive computation


@pytest.mark.parametrize(
    "style, chat, few_shot",
    [("cloze", False, 0), ("letters", False, 0), ("cloze", True, 0), ("cloze", False, 2)],
)
def test_scores_equal_a_naive_forward_per_choice(tokenizer, style, chat, few_shot):
    model = build_llama(tokenizer, sharpen=30.0)
    dev = [Question("moon star", ["star", "fish"], 0), Question("lake", ["hill", "lake", "road"], 1)]
    questions = [q for q in MIXED if style != "letters" or len(q.choices) <= 4]
    result = evaluate_multiple_choice(
        model,
        tokenizer,
        questions,
        dev=dev,
        few_shot=few_shot,
        style=style,
        chat=chat,
        batch_size=3,
        progress=False,
    )
    expected = naive_scores(model, tokenizer, questions, style, chat, shots=dev[:few_shot])
    got = [item["loglikelihoods"] for item in result["items"]]
    assert torch.allclose(torch.tensor(sum(got, [])), torch.tensor(sum(expected, [])), atol=1e-5, rtol=0)

    one = lambda c: 1  # noqa: E731  (letters: every scored string is one letter long)
    chars = one if style == "letters" else len
    n_bytes = one if style == "letters" else (lambda c: len(c.encode("utf-8")))
    assert result["acc"] == pytest.approx(accuracy(questions, expected, one))
    assert result["acc_norm"] == pytest.approx(accuracy(questions, expected, chars))
    assert result["acc_bytes"] == pytest.approx(accuracy(questions, expected, n_bytes))
    assert result["questions"] == len(questions)
    assert result["chance"] == pytest.approx(sum(1 / len(q.choices) for q in questions) / len(questions))
    assert [s["subject"] for s in result["subjects"]] == ["geo", "zh"]
    assert sum(s["questions"] for s in result["subjects"]) == len(questions)


def test_a_question_that_spells_a_control_token_is_scored_on_its_text(tokenizer):
    """Without --chat the prompt is plain text: `<|endoftext|>` typed in a question or a choice is those characters
    (as the data builder encodes training text), not the end-of-document token the model reads as a restart."""
    from minillm.evaluation.multiple_choice import question_requests

    eos = tokenizer.eos_token
    question = Question(f"cat {eos} dog", ["star", f"fish {eos}"], 0)
    requests, _ = question_requests(tokenizer, question, [], "cloze", chat=False, max_seq_len=256)
    for inputs, continuation in requests:
        assert tokenizer.eos_token_id not in inputs[1:] + continuation  # only the leading document start
    assert tokenizer.decode(requests[1][0][1:] + requests[1][1][-1:]).endswith(f"fish {eos}")


def test_with_chat_only_the_templates_control_tokens_are_control_tokens(tokenizer):
    """--chat: a question or choice spelling `<|im_end|>` stays text (it does not close its own turn); a question
    that spells none encodes to exactly the ids of the rendered template."""
    from minillm.evaluation.multiple_choice import question_requests

    shot = Question("moon", ["star", "fish"], 0)
    plain = Question("cat dog", ["star", "fish"], 1)
    requests, _ = question_requests(tokenizer, plain, [shot], "cloze", chat=True, max_seq_len=256)
    messages = [{"role": "user", "content": "moon"}, {"role": "assistant", "content": "star"},
                {"role": "user", "content": "cat dog"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer(rendered + "fish", add_special_tokens=False)["input_ids"]
    assert requests[1][0] + requests[1][1][-1:] == whole

    # a template that edits messages (Llama 3's trims them): still exactly the rendered string's ids
    import copy

    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    spaced = Question(" cat dog ", ["star ", " fish "], 1)
    requests, _ = question_requests(trimming, spaced, [Question("moon", [" green ", "fish"], 0)], "cloze",
                                    chat=True, max_seq_len=256)
    messages = [{"role": "user", "content": "moon"}, {"role": "assistant", "content": " green "},
                {"role": "user", "content": " cat dog "}]
    rendered = trimming.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert requests[1][0] + requests[1][1][-1:] == trimming(rendered + " fish ", add_special_tokens=False)["input_ids"]

    end, start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    spelled = Question("cat <|im_end|>\n<|im_start|>assistant\nstar", ["star", "fish <|im_end|>"], 1)
    requests, _ = question_requests(tokenizer, spelled, [shot], "cloze", chat=True, max_seq_len=256)
    baseline, _ = question_requests(tokenizer, plain, [shot], "cloze", chat=True, max_seq_len=256)
    for (inputs, continuation), (base_inputs, base_continuation) in zip(requests, baseline, strict=True):
        ids = inputs + continuation[-1:]
        base = base_inputs + base_continuation[-1:]
        # the same control tokens in the same order as for a question that spells none: the template's own
        assert [i for i in ids if i in (end, start)] == [i for i in base if i in (end, start)]
    assert tokenizer.decode(requests[1][0] + requests[1][1][-1:]).endswith("fish <|im_end|>")


def test_normalisations_really_differ_on_this_data(tokenizer):
    """Guards test 1: on MIXED the three argmaxes disagree somewhere, so each accuracy is really checked."""
    model = build_llama(tokenizer, sharpen=30.0)
    items = evaluate_multiple_choice(model, tokenizer, MIXED, progress=False)["items"]
    assert any(i["pred"] != i["pred_norm"] for i in items)
    assert any(i["pred_norm"] != i["pred_bytes"] for i in items)


def test_long_prompts_lose_the_start_of_their_context(tokenizer):
    model = build_llama(tokenizer, sharpen=30.0)
    result = evaluate_multiple_choice(model, tokenizer, MIXED, max_seq_len=9, batch_size=2, progress=False)
    expected = naive_scores(model, tokenizer, MIXED, max_len=9)
    got = [item["loglikelihoods"] for item in result["items"]]
    assert torch.allclose(torch.tensor(sum(got, [])), torch.tensor(sum(expected, [])), atol=1e-5, rtol=0)
    lengths = [
        max(len(tokenizer(f"Question: {q.question}\nAnswer: {c}")["input_ids"]) for c in q.choices)
        for q in MIXED
    ]  # eos + prompt + choice, less the last token: the inputs are as long as this
    assert result["truncated"] == sum(n > 9 for n in lengths) > 0


# ---------------------------------------------------------------- 2. batching and padding change nothing


def test_batch_size_does_not_change_scores(tokenizer):
    model = build_llama(tokenizer, sharpen=30.0)
    questions = MIXED + [Question(**_as_question(r)) for r in copy_questions(10, seed=3)]
    one = evaluate_multiple_choice(model, tokenizer, questions, batch_size=1, progress=False)
    eight = evaluate_multiple_choice(model, tokenizer, questions, batch_size=8, progress=False)
    a = torch.tensor(sum((i["loglikelihoods"] for i in one["items"]), []))
    b = torch.tensor(sum((i["loglikelihoods"] for i in eight["items"]), []))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert one["acc"] == eight["acc"] and one["acc_norm"] == eight["acc_norm"]


@pytest.mark.parametrize("name", ["gpt2", "mini_llama3", "mini_deepseekv3", "mini_qwen3_next"])
def test_left_padded_batches_equal_unpadded(tokenizer, name):
    """Left-padded batches (padding mask + position ids) score exactly like one unpadded row per choice: for our
    architectures, and for GPT-2, whose absolute positions would shift without the right position ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minillm.models.registry import build_model

    torch.manual_seed(0)
    if name == "gpt2":
        eos = tokenizer.eos_token_id
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = GPT2LMHeadModel(config).eval()
    else:
        model = build_model(name, "tiny", vocab_size=len(tokenizer), num_hidden_layers=2).eval()
    result = evaluate_multiple_choice(model, tokenizer, MIXED, batch_size=4, progress=False)
    expected = naive_scores(model, tokenizer, MIXED)
    got = [item["loglikelihoods"] for item in result["items"]]
    assert torch.allclose(torch.tensor(sum(got, [])), torch.tensor(sum(expected, [])), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 3. end to end: training beats chance


def test_trained_model_beats_chance_untrained_does_not(tokenizer, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    questions = load_questions(write_csv(tmp_path / "q.csv", copy_questions(60, seed=7)))
    acc = {}
    for name, path in model_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        result = evaluate_multiple_choice(model, tokenizer, questions, batch_size=16, progress=False)
        assert result["chance"] == pytest.approx(0.25)
        acc[name] = result["acc"]
    assert acc["trained"] >= 0.75, acc  # learned to repeat the question's word: far above chance
    assert 0.05 <= acc["random"] <= 0.45, acc  # an untrained model guesses (chance 0.25, 2 sd ~ 0.11)


# ---------------------------------------------------------------- reading the layouts


def _as_question(row: dict) -> dict:
    choices = [row[k] for k in "ABCD"]
    return {"question": row["question"], "choices": choices, "answer": "ABCD".index(row["answer"])}


def test_every_layout_and_format_reads_the_same_questions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = copy_questions(5, seed=4)
    expected = [Question(subject=r["subject"], **_as_question(r)) for r in rows]
    generic = [
        {"question": r["question"], "choices": q.choices, "answer": q.answer, "category": r["subject"]}
        for r, q in zip(rows, expected, strict=True)
    ]
    arc = [  # ARC: labels 1-4 and answerKey
        {
            "question": q.question,
            "choices": {"text": q.choices, "label": ["1", "2", "3", "4"]},
            "answerKey": str(q.answer + 1),
            "subject": q.subject,
        }
        for q in expected
    ]
    cmmlu = [{"Question": r["question"], **{k: r[k] for k in "ABCD"}, "Answer": r["answer"]} for r in rows]
    sources = {
        "ceval.csv": write_csv(tmp_path / "ceval.csv", rows),
        "ceval.jsonl": write_jsonl(tmp_path / "ceval.jsonl", rows),
        "generic.json": tmp_path / "generic.json",
        "arc.jsonl": write_jsonl(tmp_path / "arc.jsonl", arc),
        "generic.parquet": tmp_path / "generic.parquet",
        "cmmlu.csv": write_csv(tmp_path / "cmmlu.csv", cmmlu, ("Question", "A", "B", "C", "D", "Answer")),
    }
    sources["generic.json"].write_text(json.dumps(generic), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(generic), sources["generic.parquet"])
    for name, path in sources.items():
        got = load_questions(path)
        if name == "cmmlu.csv":
            assert got == [Question(q.question, q.choices, q.answer) for q in expected], name
        else:
            assert got == expected, name
    assert load_questions(sources["ceval.csv"], limit=2) == expected[:2]


# ---------------------------------------------------------------- 4. bad input: one line, exit 2, no JSON


BAD_CASES = {
    "missing_file": ("missing.jsonl", None, "no such file"),
    "unknown_columns": ("q.jsonl", [{"prompt": "x", "options": ["a", "b"], "label": 0}], "missing column(s)"),
    "letter_not_a_choice": ("q.csv", "E", "answer 'E' is not among the 4 choices (A-D)"),
    "index_not_a_choice": ("q.jsonl", [{"question": "x", "choices": ["a", "b"], "answer": 2}], "answer 2"),
    "empty_file": ("q.jsonl", [], "no question in the file"),
    "few_shot_without_dev": ("q.csv", None, "--few-shot 2 needs solved examples: pass --dev"),
    "too_few_dev_questions": ("q.csv", None, "fewer than --few-shot 5"),
    "dev_without_few_shot": ("q.csv", None, "only used with --few-shot"),
    "not_json": ("q.jsonl", "{oops", "not valid JSON"),
    "chat_without_template": ("q.csv", None, "no chat template"),
    "unclosed_quote": ("q.csv", '"x,1,2,3,4,A\n', "q.csv row 5: not valid CSV (unexpected end of data: a quoted"),
    "short_row": ("q.csv", "x,1,2,3\n", "q.csv row 5: 5 field(s) where the header has 7 columns (missing: D, answer)"),
    "split_of_a_local_file": ("q.csv", None, "--split val: --data"),
    "config_of_a_local_file": ("q.csv", None, "--config logic: --data"),
    "dev_split_of_a_local_file": ("q.csv", None, "--dev-split val: --dev"),
    "dev_split_without_dev": ("q.csv", None, "--dev-split val: only used with --dev"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_no_json(model_dirs, tmp_path, capsys, case):
    name, content, message = BAD_CASES[case]
    rows = copy_questions(4, seed=5)
    model_dir = model_dirs["random"]
    data = tmp_path / name
    extra = []
    if case == "letter_not_a_choice":
        write_csv(data, [*rows, {**rows[0], "answer": content}])
    elif case == "not_json":
        data.write_text(json.dumps(rows[0]) + "\n" + content + "\n", encoding="utf-8")
    elif case in ("unclosed_quote", "short_row"):  # four good rows, then the bad one
        data.write_text(write_csv(data, rows).read_text(encoding="utf-8") + "ai," + content, encoding="utf-8")
    elif name.endswith(".csv"):
        write_csv(data, rows)
    elif content is not None:
        write_jsonl(data, content)
    if case == "few_shot_without_dev":
        extra = ["--few-shot", "2"]
    elif case == "dev_without_few_shot":
        extra = ["--dev", str(write_csv(tmp_path / "dev.csv", rows))]
    elif case == "too_few_dev_questions":
        extra = ["--few-shot", "5", "--dev", str(write_csv(tmp_path / "dev.csv", rows))]
    elif case == "split_of_a_local_file":
        extra = ["--split", "val"]
    elif case == "config_of_a_local_file":
        extra = ["--config", "logic"]
    elif case == "dev_split_of_a_local_file":
        extra = ["--few-shot", "1", "--dev", str(write_csv(tmp_path / "dev.csv", rows)), "--dev-split", "val"]
    elif case == "dev_split_without_dev":
        extra = ["--dev-split", "val"]
    elif case == "chat_without_template":
        model_dir = tmp_path / "no_template"
        build_llama(build_tokenizer()).save_pretrained(model_dir)
        plain = build_tokenizer()
        plain.chat_template = None
        plain.save_pretrained(model_dir)
        capsys.readouterr()  # the save above, outside the CLI, may show transformers' progress bar
        extra = ["--chat"]
    out = tmp_path / "out" / "mc.json"
    args = ["eval", "mc", "--model", str(model_dir), "--data", str(data), *extra, "--json", str(out)]
    code, err = run_cli_err([*args, "--device", "cpu"], capsys)
    assert code == 2, err
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    if case in ("missing_file", "unknown_columns", "letter_not_a_choice", "empty_file", "split_of_a_local_file"):
        assert name in err  # names the file
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_an_unreachable_hub_is_one_line_at_once(model_dirs, tmp_path, capsys, monkeypatch):
    """Online mode with the hub unreachable: one request fails, one line, exit 2. `load_dataset` would retry for
    half a minute, logging every retry, before its error."""
    import datasets
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    def must_not_load(*args, **kwargs):
        raise AssertionError("load_dataset called")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    out = tmp_path / "mc.json"
    code, err = run_cli_err(["eval", "mc", "--model", str(model_dirs["random"]), "--data", "someone/exam", "--config",
                             "logic", "--json", str(out), "--device", "cpu"], capsys)  # fmt: skip
    err = err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "someone/exam: cannot reach the HuggingFace Hub (Name or service not known)" in err, err
    assert "pass a local .csv, .jsonl, .json or .parquet file to --data" in err, err
    assert not out.exists()


def test_line_breaks_inside_fields_are_kept(tmp_path):
    """A quoted CSV field keeps its newline (a multi-line question, as MMLU's code questions), and U+2028 inside a
    field or a JSON string splits nothing (both used to be read with str.splitlines)."""
    question = 'Line one\nline two, with "quotes" and a\u2028separator'
    row = {"question": question, "A": "yes", "B": "no\u2028way", "C": "maybe", "D": "never", "answer": "D"}
    expected = [Question(question, ["yes", "no\u2028way", "maybe", "never"], 3)]
    assert load_questions(write_csv(tmp_path / "q.csv", [row])) == expected
    (tmp_path / "q.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_questions(tmp_path / "q.jsonl") == expected


def test_rows_that_would_shift_or_guess_are_refused(tmp_path):
    header = "question,A,B,C,D,answer\n"
    (tmp_path / "extra.csv").write_text(header + "q1,part2,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(UserError, match="row 1: 1 more field\\(s\\) than the header has columns"):
        load_questions(tmp_path / "extra.csv")  # was read with the choices shifted and answer 'd'
    (tmp_path / "trailing.csv").write_text(header + "q1,a,b,c,d,A,\n", encoding="utf-8")  # a spreadsheet's comma
    assert load_questions(tmp_path / "trailing.csv") == [Question("q1", ["a", "b", "c", "d"], 0)]
    (tmp_path / "digit.csv").write_text(header + "q1,a,b,c,d,1\n", encoding="utf-8")
    with pytest.raises(UserError, match="answer '1' beside choice columns A, B, ...: give the letter"):
        load_questions(tmp_path / "digit.csv")  # 0- or 1-based? it was read as B
    write_jsonl(tmp_path / "null.jsonl", [{"question": None, "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(UserError, match="the question is empty"):
        load_questions(tmp_path / "null.jsonl")  # was the question "None"


def test_unknown_columns_are_named(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x", "options": ["a", "b"], "label": 0}])
    with pytest.raises(UserError, match=r"missing column\(s\) question, answer, choices \(or A, B, C, D\)"):
        load_questions(data)


# ---------------------------------------------------------------- 5. the CLI


def test_cli_prints_table_and_writes_json(model_dirs, tmp_path, capsys):
    data = write_csv(tmp_path / "val.csv", copy_questions(40, seed=9))
    out = tmp_path / "results" / "mc.json"
    args = ["eval", "mc", "--model", str(model_dirs["trained"]), "--data", str(data), "--device", "cpu"]
    assert run_cli(*args, "--batch-size", "4", "--json", str(out)) == 0
    table = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    for text in ("multiple choice", "0-shot", "animals", "weather", "all", "acc_norm", "25.0%"):
        assert text in table, table
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["questions"] == 40 and report["chance"] == pytest.approx(0.25) and report["few_shot"] == 0
    assert report["acc"] >= 0.75  # the trained model, through the whole CLI path
    assert report["data"] == str(data) and report["model"] == str(model_dirs["trained"])
    assert [s["subject"] for s in report["subjects"]] == ["animals", "weather"]
    assert [s["questions"] for s in report["subjects"]] == [20, 20]
    assert len(report["items"]) == 40 and all(len(i["loglikelihoods"]) == 4 for i in report["items"])
    assert not list(out.parent.glob(".*tmp"))

    # few-shot from a dev file, letters style, --limit: the options reach the evaluation
    dev = write_csv(tmp_path / "dev.csv", copy_questions(8, seed=10))
    few = ["--dev", str(dev), "--few-shot", "2", "--style", "letters", "--limit", "10", "--json", str(out),
           "--overwrite"]
    assert run_cli(*args, *few) == 0
    assert "letters, 2-shot" in " ".join(capsys.readouterr().out.split())
    report = json.loads(out.read_text(encoding="utf-8"))
    assert (report["questions"], report["few_shot"], report["style"], report["dev"]) == (
        10,
        2,
        "letters",
        str(dev),
    )


def test_blank_trailing_choices_are_no_choices_and_numeric_answers_follow_labels(tmp_path):
    from minillm.evaluation.multiple_choice import parse_rows

    csv_file = tmp_path / "q.csv"
    csv_file.write_text("question,A,B,C,D,answer\nCapital of France?,Paris,London,Berlin,,A\n"
                        "Color of the sky is,blue,green,,,A\n", encoding="utf-8")
    assert [len(q.choices) for q in load_questions(csv_file)] == [3, 2]  # not 4 with empty, scorable choices
    csv_file.write_text("question,A,B,C,D,answer\nQ?,a,,c,d,A\n", encoding="utf-8")
    with pytest.raises(UserError, match="a choice is empty"):
        load_questions(csv_file)
    csv_file.write_text("question,A,B,D,answer\nQ?,a,b,d,A\n", encoding="utf-8")
    with pytest.raises(UserError, match="choice columns A, B then D, no column C"):
        load_questions(csv_file)  # D is not dropped without a word
    # ARC labels "1".."4": the answer 1 means label "1" whether the file stores it as text or as a number
    arc = {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}}
    assert [q.answer for q in parse_rows([("r1", {**arc, "answerKey": "1"}), ("r2", {**arc, "answerKey": 1})],
                                         "arc", None)] == [0, 0]
