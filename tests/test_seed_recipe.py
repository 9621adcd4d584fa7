"""The seed's data recipe (`scripts/seed_data_recipe.py`) on small local stand-ins for Fineweb and deepctrl.

Everything but the hub download runs here: the stratified sampling, the score filter, the deepctrl conversion and
the balanced SFT sample, the file layout, and the minillm commands that build tokenizer, shards and SFT set. The
local files go through the same `datasets` streaming code path the hub data takes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "seed_data_recipe.py"
spec = importlib.util.spec_from_file_location("seed_data_recipe", SCRIPT)
recipe_mod = importlib.util.module_from_spec(spec)
sys.modules["seed_data_recipe"] = recipe_mod  # dataclasses look their module up there
spec.loader.exec_module(recipe_mod)

SOURCES = {"map-cc": 600, "opencsg-cc": 300, "wiki": 90, "tiny": 10}
WORDS = "学 习 语 言 模 型 数 据 训 练 the model learns from text every day and night".split()


def text(rng: random.Random, n: int = 30) -> str:
    return "".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture
def fineweb_files(tmp_path) -> list[str]:
    """Two parquet files like the 4_5 folder: text, source, score (a few rows below 4 to be filtered)."""
    rng = random.Random(0)
    rows = [(source, 4.0 + rng.random()) for source, n in SOURCES.items() for _ in range(n)]
    rows += [("map-cc", 3.5)] * 50  # out of the 4-5 range
    rng.shuffle(rows)
    paths = []
    for k, part in enumerate((rows[:500], rows[500:])):
        path = tmp_path / "fineweb" / f"{k:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        table = pa.table(
            {
                "text": [text(rng) for _ in part],
                "source": [s for s, _ in part],
                "score": [sc for _, sc in part],
            }
        )
        pq.write_table(table, path)
        paths.append(str(path))
    return paths


@pytest.fixture
def deepctrl_file(tmp_path) -> Path:
    """deepctrl-like jsonl: single-turn rows of three types, multi-turn rows, broken rows and a bad line."""
    rng = random.Random(1)
    lines = []
    for kind_type, n in (("qa", 60), ("code", 30), ("math", 6)):
        for _ in range(n):
            lines.append(
                {
                    "instruction": text(rng, 8),
                    "input": text(rng, 4),
                    "output": text(rng, 20),
                    "history": [],
                    "type": kind_type,
                }
            )
    for _ in range(20):
        lines.append(
            {
                "instruction": "",
                "input": text(rng, 8),
                "output": text(rng, 20),
                "type": "chat",
                "history": [[text(rng, 5), text(rng, 10)], [text(rng, 5), text(rng, 10)]],
            }
        )
    lines.append({"instruction": "q", "input": "", "output": "", "history": None, "type": "qa"})  # no answer
    lines.append(
        {"instruction": "q", "input": "x", "output": "a", "history": [["only user", ""]], "type": "qa"}
    )
    lines.append(
        {"instruction": "", "input": "hi", "output": "ok", "history": None, "type": "qa"}
    )  # too short
    path = tmp_path / "sft_data_zh.jsonl"
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines)
    path.write_text(body + "{not json\n", encoding="utf-8")
    return path


def test_stratified_sampler_keeps_every_source_share():
    sampler = recipe_mod.StratifiedSampler(0.2, seed=5)
    rng = random.Random(3)
    strata = [s for s, n in SOURCES.items() for _ in range(n)]
    rng.shuffle(strata)
    kept = []
    for start in range(0, len(strata), 77):  # uneven batches, as files and stream batches are
        batch = strata[start : start + 77]
        kept += [batch[i] for i in sampler.select(batch)]
    assert Counter(kept) == {"map-cc": 120, "opencsg-cc": 60, "wiki": 18, "tiny": 2}
    other = recipe_mod.StratifiedSampler(0.2, seed=6)
    assert other.select(strata[:300]) != recipe_mod.StratifiedSampler(0.2, seed=5).select(strata[:300])
    with pytest.raises(ValueError):
        recipe_mod.StratifiedSampler(0.0, seed=0)


def test_balanced_quotas_water_fill():
    assert recipe_mod.balanced_quotas({"a": 100, "b": 100, "c": 5}, 60) == {"c": 5, "a": 27, "b": 28}
    assert recipe_mod.balanced_quotas({"a": 3, "b": 4}, 50) == {"a": 3, "b": 4}  # fewer than asked: all of it
    assert recipe_mod.score_mask([4.2, 3.9, None, 5.0], 4.0, 5.0) == [True, False, True, True]
    assert recipe_mod.score_mask(None, 4.0, 5.0) is None


def test_deepctrl_row_conversion():
    row = {
        "instruction": "把这句话翻译成英文：",
        "input": "你好",
        "output": "Hello",
        "history": [["在吗", "在的"]],
        "type": "translate",
    }
    assert recipe_mod.deepctrl_messages(row) == [
        {"role": "user", "content": "在吗"},
        {"role": "assistant", "content": "在的"},
        {"role": "user", "content": "把这句话翻译成英文：你好"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert recipe_mod.deepctrl_text(row) == "把这句话翻译成英文：你好Hello"
    assert recipe_mod.deepctrl_messages({**row, "history": [["q", ""]]}) is None
    assert recipe_mod.deepctrl_messages({**row, "output": " "}) is None


def test_download_step_on_local_files(tmp_path, fineweb_files, deepctrl_file):
    recipe = recipe_mod.Recipe(
        out=tmp_path / "seed", sft_samples=40, sft_multi_turn_ratio=0.25, sft_min_chars=20, rows_per_file=150
    )
    stats = recipe_mod.download(recipe, fineweb_files, str(deepctrl_file))
    raw = recipe.raw

    # fineweb: score filter, then exact per-source shares of the 1,000 rows in range
    assert stats["fineweb"]["rows"] == 1050 and stats["fineweb"]["dropped_by_score_or_empty"] == 50
    pretrain = pq.read_table(sorted((raw / "fineweb_pretrain").glob("*.parquet"))).to_pydict()
    assert Counter(pretrain["source"]) == {"map-cc": 120, "opencsg-cc": 60, "wiki": 18, "tiny": 2}
    assert min(pretrain["score"]) >= 4.0 and set(pretrain) == {"text", "source", "score"}
    tok_rows = pq.read_table(sorted((raw / "fineweb_tokenizer").glob("*.parquet"))).num_rows
    assert tok_rows == 30 + 15 + 5 + 1  # 5% of 600, 300, 90, 10, rounded half up
    assert sorted(p.name for p in (raw / "fineweb_pretrain").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]

    # deepctrl: every row with text becomes pretraining text; SFT sample balanced and capped
    assert stats["deepctrl"]["rows"] == 119 and stats["deepctrl"]["pretrain_texts"] == 119
    assert stats["deepctrl"]["not_a_conversation"] == 2 and stats["deepctrl"]["length_filtered"] == 1
    conversations = [
        json.loads(line) for line in (raw / "deepctrl_sft.jsonl").read_text("utf-8").splitlines()
    ]
    assert len(conversations) == 40
    multi = sum(len(c["messages"]) > 2 for c in conversations)
    assert multi == 10  # 25% of 40
    assert stats["sft_sample"]["by_stratum"] == {
        "single/math": 6,
        "single/code": 12,
        "single/qa": 12,
        "multi/chat": 10,
    }
    assert not (recipe.out / "work").exists() and not list(raw.glob("*.tmp"))

    again = recipe_mod.Recipe(
        out=tmp_path / "again", sft_samples=40, sft_multi_turn_ratio=0.25, rows_per_file=150
    )
    recipe_mod.download(again, fineweb_files, str(deepctrl_file))
    assert (again.raw / "deepctrl_sft.jsonl").read_text() == (
        raw / "deepctrl_sft.jsonl"
    ).read_text()  # seeded


def test_build_commands_and_dry_run(tmp_path, capsys):
    out = tmp_path / "seed"
    assert recipe_mod.main(["build", "--out", str(out), "--dry-run", "--vocab-size", "8000"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("minillm tokenizer train --data") and "--vocab-size 8000" in printed[0]
    assert all("--overwrite" in line for line in printed[:3])  # a build can be run again (after a failed step)
    assert printed[1].startswith("minillm data pretrain") and printed[1].count("--input") == 2
    assert "--pack" in printed[2] and "--max-seq-len 512" in printed[2]
    assert not (out / "recipe.json").exists()
    # building before downloading is a one-line error, exit code 2
    assert recipe_mod.main(["build", "--out", str(out)]) == 2
    assert "run the download step first" in capsys.readouterr().err
    assert (
        recipe_mod.main(["download", "--out", str(out), "--fineweb-files", str(tmp_path / "none.parquet")])
        == 2
    )
    assert "none.parquet: no such file" in capsys.readouterr().err
    assert list((out / "raw").iterdir()) == []  # the half-made samples were removed


def test_all_steps_build_tokenizer_shards_and_packed_sft(tmp_path, fineweb_files, deepctrl_file):
    """The whole recipe on the local stand-ins, through the real minillm commands."""
    out = tmp_path / "seed"
    code = recipe_mod.main(
        [
            "all",
            "--out",
            str(out),
            "--fineweb-files",
            *fineweb_files,
            "--deepctrl-file",
            str(deepctrl_file),
            "--sft-samples",
            "40",
            "--vocab-size",
            "400",
            "--sft-max-seq-len",
            "256",
            "--val-fraction",
            "0.1",
        ]
    )
    assert code == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == 404 and "generation %}" in tokenizer.chat_template
    pretrain = json.loads((out / "pretrain" / "manifest.json").read_text())
    assert pretrain["documents"] == 200 + 119  # 20% of the in-range Fineweb rows + every deepctrl row
    assert set(pretrain["splits"]) == {"train", "val"}
    sft = json.loads((out / "sft_packed" / "manifest.json").read_text())
    summary = sft["summary"]
    assert summary["rows_read"] == summary["conversations"] == 40 and summary["rows"] < 40  # packed
    record = json.loads((out / "recipe.json").read_text())
    assert record["parameters"]["sft_samples"] == 40 and len(record["commands"]) == 3
    assert record["sft_sample"]["conversations"] == 40
