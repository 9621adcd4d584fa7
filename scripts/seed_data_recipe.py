"""The seed's (Mini-LLM's) data recipe, end to end: raw datasets from the HF hub -> tokenizer, pretraining shards,
packed SFT set.

    python scripts/seed_data_recipe.py all --out data                 # download (stream + sample) and build
    python scripts/seed_data_recipe.py download --out data            # only the sampled raw files
    python scripts/seed_data_recipe.py build --out data               # tokenizer + shards + SFT from them
    python scripts/seed_data_recipe.py build --out data --dry-run     # print the minillm commands only
    # from local copies instead of the hub (e.g. a ModelScope download of the same files):
    python scripts/seed_data_recipe.py all --out data \\
        --fineweb-files 'fineweb/4_5/*.parquet' --deepctrl-file deepctrl/sft_data_zh.jsonl
    # then train with the shipped recipes, which read data/pretrain and data/sft_packed:
    minillm pretrain --config recipes/pretrain_deepseekv3_base.yaml
    minillm sft --config recipes/sft_deepseekv3_base.yaml

What it does (the numbers are the seed's defaults, all flags):
1. Fineweb-Edu-Chinese-V2.1 (`opencsg/Fineweb-Edu-Chinese-V2.1`), the score 4-5 folder `4_5/` (about 9,745 parquet
   files, 70 GB, 17.8M documents), streamed once through `datasets`: rows outside the score range are dropped
   (when the files carry a `score` column), then two independent samples stratified by `source` (every source
   keeps its share, as in the seed): 5% for tokenizer training and 20% for pretraining.
2. The deepctrl SFT set (`deepctrl/deepctrl-sft-data`, file `sft_data_zh.jsonl`, about 16 GB, 11.4M rows with
   instruction / input / output / history / type), streamed once: every row becomes pretraining text (instruction
   + input + output, as the seed did: small models first learn the answers as plain text), and every row that
   makes a valid conversation of plausible length becomes an SFT candidate. 50,000 candidates are sampled, at most
   20% multi-turn, balanced over the dataset's `type` categories.
3. `minillm tokenizer train` on the 5% sample (32,000 base vocabulary + 4 special tokens).
4. `minillm data pretrain` on the 20% Fineweb sample + all deepctrl text, with a small validation split.
5. `minillm data sft --pack` on the 50,000 conversations at 512 tokens, the context the base models are pretrained
   at (too-long conversations dropped, as the seed's filter did).

Layout of `--out`:
    raw/fineweb_tokenizer/part-00000.parquet ...     (text, source[, score])
    raw/fineweb_pretrain/part-00000.parquet ...
    raw/deepctrl_pretrain/part-00000.parquet ...     (text)
    raw/deepctrl_sft.jsonl                           ({"messages": [...]}, one conversation per line)
    work/sft_candidates/                             (candidates by stratum; deleted once sampled)
    tokenizer/  pretrain/  sft_packed/               (what minillm builds; the recipes/ configs read them)
    recipe.json                                      (the parameters and the counts of every step)

Differences from the seed: it downloaded whole folders from ModelScope and sampled afterwards; this streams and
samples in one pass (no 70 GB on disk). Its 200 self-cognition conversations were generated with a paid API; use
your own identity conversations (`minillm`'s built-in sample has some) by adding them with `--extra-sft FILE`.
Everything except `stream_*` works on local files and is tested in `tests/test_seed_recipe.py`.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

FINEWEB_REPO = "opencsg/Fineweb-Edu-Chinese-V2.1"
FINEWEB_SCORE_DIR = "4_5"
DEEPCTRL_REPO = "deepctrl/deepctrl-sft-data"
DEEPCTRL_FILE = "sft_data_zh.jsonl"
STREAM_BATCH = 10_000
RAW_OUTPUTS = ("fineweb_tokenizer", "fineweb_pretrain", "deepctrl_pretrain", "deepctrl_sft.jsonl")


@dataclass
class Recipe:
    """Every knob of the recipe; the defaults are the seed's."""

    out: Path
    tokenizer_ratio: float = 0.05
    pretrain_ratio: float = 0.20
    min_score: float = 4.0
    max_score: float = 5.0
    sft_samples: int = 50_000
    sft_multi_turn_ratio: float = 0.2
    sft_max_seq_len: int = 512
    sft_min_chars: int = 20  # shorter conversations teach nothing (the seed: 20 tokens)
    sft_max_chars: int = (
        1200  # cheap pre-filter (~2 chars/token); `minillm data sft` drops what is still too long
    )
    vocab_size: int = 32_000
    val_fraction: float = 0.001
    seed: int = 123
    rows_per_file: int = 200_000
    extra_sft: list[Path] = field(default_factory=list)

    @property
    def raw(self) -> Path:
        return self.out / "raw"


# --------------------------------------------------------------------------------------------- sampling


class StratifiedSampler:
    """Keeps `ratio` of the rows of every stratum (e.g. each `source`), choosing them at random, in one pass.

    After every batch, each stratum has kept round(seen * ratio) rows: the shares of the strata in the sample
    equal those in the data (to within one row), however the strata are spread over the files.
    """

    def __init__(self, ratio: float, seed: int) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"sampling ratio {ratio} must be in (0, 1]")
        self.ratio = ratio
        self.rng = random.Random(seed)
        self.seen: Counter[str] = Counter()
        self.taken: Counter[str] = Counter()

    def select(self, strata: Sequence[str]) -> list[int]:
        """Indices of the rows of this batch to keep, in order; `strata[i]` is row i's stratum."""
        rows_of: dict[str, list[int]] = defaultdict(list)
        for i, stratum in enumerate(strata):
            rows_of[stratum].append(i)
        keep: list[int] = []
        for stratum, rows in rows_of.items():
            self.seen[stratum] += len(rows)
            quota = math.floor(self.seen[stratum] * self.ratio + 0.5) - self.taken[stratum]
            quota = max(0, min(quota, len(rows)))
            keep.extend(self.rng.sample(rows, quota))
            self.taken[stratum] += quota
        return sorted(keep)


def score_mask(scores: Sequence[float | None] | None, low: float, high: float) -> list[bool] | None:
    """Which rows have a score in [low, high]. None when the data has no score column (the folder is the score
    range already); a row with a missing score is kept."""
    if scores is None:
        return None
    return [s is None or low <= s <= high for s in scores]


def balanced_quotas(available: dict[str, int], target: int) -> dict[str, int]:
    """Split `target` over categories as evenly as their sizes allow (water filling): small categories give all
    they have, the rest share what is left equally. The total is min(target, sum(available))."""
    quotas: dict[str, int] = {}
    remaining = target
    ordered = sorted(available, key=lambda k: (available[k], k))
    for i, key in enumerate(ordered):
        share = min(available[key], remaining // (len(ordered) - i))
        quotas[key] = share
        remaining -= share
    return quotas


# --------------------------------------------------------------------------------------------- files


class ParquetShards:
    """Rows appended in batches, written as `part-NNNNN.parquet` files of `rows_per_file` rows.

    The files go to a temporary sibling directory renamed into place by `close()`, so an interrupted run leaves no
    half-written output where the build step would pick it up.
    """

    def __init__(self, directory: Path, rows_per_file: int) -> None:
        self.directory = directory
        self.tmp = directory.with_name(directory.name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.rows_per_file = rows_per_file
        self.buffer: dict[str, list] = defaultdict(list)
        self.files = 0
        self.rows = 0

    def add(self, columns: dict[str, list]) -> None:
        for name, values in columns.items():
            self.buffer[name].extend(values)
        while self.buffer and len(next(iter(self.buffer.values()))) >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name: values[:n] for name, values in self.buffer.items()})
        pq.write_table(table, self.tmp / f"part-{self.files:05d}.parquet")
        self.files += 1
        self.rows += table.num_rows
        self.buffer = defaultdict(list, {name: values[n:] for name, values in self.buffer.items()})

    def abort(self) -> None:
        """Drop everything written so far (the run failed)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> None:
        rest = len(next(iter(self.buffer.values()))) if self.buffer else 0
        if rest:
            self._flush(rest)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.tmp.rename(self.directory)


# --------------------------------------------------------------------------------------------- streams (network)


def stream_fineweb(files: Sequence[str] | None = None) -> Iterator[dict[str, list]]:
    """Batches (column -> values) of Fineweb-Edu-Chinese-V2.1's score 4-5 folder, streamed from the hub through
    `datasets`; or of local parquet files with the same columns (`files`: paths or globs)."""
    import datasets

    if files:
        paths = _expand(files)
        dataset = datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True)
    else:
        dataset = datasets.load_dataset(
            FINEWEB_REPO, data_dir=FINEWEB_SCORE_DIR, split="train", streaming=True
        )
    yield from dataset.iter(batch_size=STREAM_BATCH)


def stream_deepctrl(file: str | None = None) -> Iterator[dict]:
    """Rows of the deepctrl SFT jsonl, streamed from the hub through `datasets`, or from a local copy.

    Read as lines and parsed here: the rows' `history` is null, a list of pairs or missing, which defeats schema
    inference; a line that is not valid JSON is skipped.
    """
    import datasets

    source = file if file else f"hf://datasets/{DEEPCTRL_REPO}/{DEEPCTRL_FILE}"
    if file and not Path(file).is_file():
        raise FileNotFoundError(f"--deepctrl-file {file}: no such file")
    dataset = datasets.load_dataset("text", data_files=source, split="train", streaming=True)
    for batch in dataset.iter(batch_size=STREAM_BATCH):
        for line in batch["text"]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def _expand(patterns: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        missing = [p for p in matches if not Path(p).is_file()]
        if not matches or missing:
            raise FileNotFoundError(f"--fineweb-files {pattern}: no such file")
        paths.extend(matches)
    return paths


# --------------------------------------------------------------------------------------------- step 1: fineweb


def sample_fineweb(batches: Iterable[dict[str, list]], recipe: Recipe) -> dict:
    """Score filter + the two stratified samples (tokenizer, pretraining), written as parquet shards."""
    samples = {
        "fineweb_tokenizer": StratifiedSampler(recipe.tokenizer_ratio, recipe.seed),
        "fineweb_pretrain": StratifiedSampler(recipe.pretrain_ratio, recipe.seed + 1),
    }
    writers = {name: ParquetShards(recipe.raw / name, recipe.rows_per_file) for name in samples}
    rows = dropped_score = 0
    try:
        for batch in batches:
            n, dropped = _sample_batch(batch, samples, writers, recipe)
            rows += n
            dropped_score += dropped
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return {
        "rows": rows,
        "dropped_by_score_or_empty": dropped_score,
        **{name: {"rows": writers[name].rows, "by_source": dict(s.taken)} for name, s in samples.items()},
    }


def _sample_batch(batch: dict[str, list], samples: dict, writers: dict, recipe: Recipe) -> tuple[int, int]:
    """One stream batch through the score filter and both samplers; (rows seen, rows dropped)."""
    if "text" not in batch:
        raise ValueError(f"fineweb rows have no 'text' column (found: {', '.join(batch)})")
    columns = {k: v for k, v in batch.items() if k in ("text", "source", "score")}
    n = len(columns["text"])
    mask = score_mask(columns.get("score"), recipe.min_score, recipe.max_score)
    kept = [i for i in range(n) if columns["text"][i] and (mask is None or mask[i])]
    columns = {k: [v[i] for i in kept] for k, v in columns.items()}
    strata = columns.get("source") or ["all"] * len(kept)
    for name, sampler in samples.items():
        chosen = sampler.select([str(s) for s in strata])
        writers[name].add({k: [v[i] for i in chosen] for k, v in columns.items()})
    return n, n - len(kept)


# --------------------------------------------------------------------------------------------- step 2: deepctrl


def deepctrl_text(row: dict) -> str:
    """The row as pretraining text: instruction + input + output, concatenated as the seed did ('' if empty)."""
    parts = [str(row.get(k) or "").strip() for k in ("instruction", "input", "output")]
    return "".join(p for p in parts if p)


def deepctrl_messages(row: dict) -> list[dict[str, str]] | None:
    """The row as a conversation (history pairs, then instruction + input -> output); None if it is not one."""
    messages = []
    for turn in row.get("history") or []:
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not turn[0] or not turn[1]:
            return None  # a broken history makes the whole conversation unreliable (as in the seed)
        messages += [
            {"role": "user", "content": str(turn[0])},
            {"role": "assistant", "content": str(turn[1])},
        ]
    user = str(row.get("instruction") or "") + str(row.get("input") or "")
    answer = str(row.get("output") or "")
    if not user.strip() or not answer.strip():
        return None
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def split_deepctrl(rows: Iterable[dict], recipe: Recipe) -> dict:
    """Pretraining text for every row; SFT candidates (by single/multi-turn and `type`) to disk, counted."""
    writer = ParquetShards(recipe.raw / "deepctrl_pretrain", recipe.rows_per_file)
    candidates = recipe.out / "work" / "sft_candidates"
    if candidates.exists():
        shutil.rmtree(candidates)
    candidates.mkdir(parents=True)
    handles: dict[str, TextIO] = {}
    counts: Counter[str] = Counter()
    texts: list[str] = []
    n_rows = invalid = length_filtered = 0
    try:
        for row in rows:
            n_rows += 1
            text = deepctrl_text(row)
            if text:
                texts.append(text)
                if len(texts) >= STREAM_BATCH:
                    writer.add({"text": texts})
                    texts = []
            messages = deepctrl_messages(row)
            if messages is None:
                invalid += 1
                continue
            chars = sum(len(m["content"]) for m in messages)
            if not recipe.sft_min_chars <= chars <= recipe.sft_max_chars:
                length_filtered += 1
                continue
            stratum = f"{'multi' if len(messages) > 2 else 'single'}/{row.get('type') or 'unknown'}"
            if stratum not in handles:
                handles[stratum] = (candidates / f"{len(handles):04d}.jsonl").open("w", encoding="utf-8")
            handles[stratum].write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            counts[stratum] += 1
    except BaseException:
        writer.abort()
        shutil.rmtree(candidates.parent, ignore_errors=True)
        raise
    finally:
        for handle in handles.values():
            handle.close()
    if texts:
        writer.add({"text": texts})
    writer.close()
    index = {stratum: f"{i:04d}.jsonl" for i, stratum in enumerate(handles)}
    (candidates / "index.json").write_text(json.dumps({"files": index, "counts": counts}, ensure_ascii=False))
    return {
        "rows": n_rows,
        "pretrain_texts": writer.rows,
        "not_a_conversation": invalid,
        "length_filtered": length_filtered,
        "candidates": dict(counts),
    }


def sample_sft(recipe: Recipe) -> dict:
    """`sft_samples` conversations from the candidates: at most `sft_multi_turn_ratio` multi-turn, each kind
    balanced over `type`; shuffled, written to raw/deepctrl_sft.jsonl (plus any --extra-sft conversations)."""
    candidates = recipe.out / "work" / "sft_candidates"
    index = json.loads((candidates / "index.json").read_text())
    counts: dict[str, int] = index["counts"]
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    for stratum, count in counts.items():
        kind, kind_type = stratum.split("/", 1)
        by_kind[kind][kind_type] = count
    multi_available = sum(by_kind["multi"].values())
    multi_target = min(round(recipe.sft_samples * recipe.sft_multi_turn_ratio), multi_available)
    targets = {"multi": multi_target, "single": recipe.sft_samples - multi_target}
    rng = random.Random(recipe.seed)
    chosen: list[str] = []
    quotas_used: dict[str, int] = {}
    for kind in ("single", "multi"):
        for kind_type, quota in balanced_quotas(by_kind[kind], targets[kind]).items():
            stratum = f"{kind}/{kind_type}"
            picks = set(rng.sample(range(counts[stratum]), quota))
            quotas_used[stratum] = quota
            with (candidates / index["files"][stratum]).open(encoding="utf-8") as handle:
                chosen.extend(line for i, line in enumerate(handle) if i in picks)
    extra = 0
    for path in recipe.extra_sft:
        lines = [line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        chosen.extend(lines)
        extra += len(lines)
    rng.shuffle(chosen)
    out = recipe.raw / "deepctrl_sft.jsonl"
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(chosen), encoding="utf-8")
    tmp.replace(out)
    shutil.rmtree(candidates.parent)
    return {"conversations": len(chosen), "extra": extra, "by_stratum": quotas_used}


# --------------------------------------------------------------------------------------------- steps 3-5: minillm


def build_commands(recipe: Recipe) -> list[list[str]]:
    """The `minillm` commands that turn the raw files into training data (arguments after `minillm`)."""
    raw, out = recipe.raw, recipe.out
    return [
        [
            "tokenizer",
            "train",
            "--data",
            str(raw / "fineweb_tokenizer" / "*.parquet"),
            "--vocab-size",
            str(recipe.vocab_size),
            "--out",
            str(out / "tokenizer"),
            "--overwrite",  # a re-run rebuilds every step (the same tokenizer: its training is deterministic)
        ],
        [
            "data",
            "pretrain",
            "--input",
            str(raw / "fineweb_pretrain" / "*.parquet"),
            "--input",
            str(raw / "deepctrl_pretrain" / "*.parquet"),
            "--tokenizer",
            str(out / "tokenizer"),
            "--val-fraction",
            str(recipe.val_fraction),
            "--out",
            str(out / "pretrain"),
            "--overwrite",
        ],
        [
            "data",
            "sft",
            "--input",
            str(raw / "deepctrl_sft.jsonl"),
            "--tokenizer",
            str(out / "tokenizer"),
            "--max-seq-len",
            str(recipe.sft_max_seq_len),
            "--pack",
            "--truncation",
            "drop",
            "--out",
            str(out / "sft_packed"),
            "--overwrite",
        ],
    ]


def run_minillm(args: list[str]) -> None:
    """Run one `minillm` command in this process (the same code path as the console script)."""
    print("+ minillm " + " ".join(args), flush=True)
    from cli.main import app

    app(args=args, standalone_mode=False)


# --------------------------------------------------------------------------------------------- driver


def download(recipe: Recipe, fineweb_files: Sequence[str] | None, deepctrl_file: str | None) -> dict:
    """Steps 1-2: stream, filter and sample both datasets into `raw/`."""
    stats = {"fineweb": sample_fineweb(stream_fineweb(fineweb_files), recipe)}
    stats["deepctrl"] = split_deepctrl(stream_deepctrl(deepctrl_file), recipe)
    stats["sft_sample"] = sample_sft(recipe)
    return stats


def build(recipe: Recipe, dry_run: bool = False) -> list[list[str]]:
    """Steps 3-5: the minillm commands (printed only, with `dry_run`)."""
    commands = build_commands(recipe)
    for args in commands:
        if dry_run:
            print("minillm " + " ".join(f"'{a}'" if "*" in a else a for a in args))
        else:
            run_minillm(args)
    return commands


def write_record(recipe: Recipe, stats: dict) -> None:
    """recipe.json: the parameters and counts, merged with an earlier run's (download and build run apart)."""
    path = recipe.out / "recipe.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(recipe).items()}
    params["extra_sft"] = [str(p) for p in recipe.extra_sft]
    record.update({"parameters": params, **stats})
    path.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["download", "build", "all"])
    parser.add_argument("--out", type=Path, required=True, help="Directory for everything the recipe writes.")
    parser.add_argument(
        "--fineweb-files", nargs="+", help="Local Fineweb parquet files/globs instead of the hub."
    )
    parser.add_argument("--deepctrl-file", help="Local sft_data_zh.jsonl instead of the hub.")
    parser.add_argument(
        "--extra-sft", type=Path, nargs="*", default=[], help="More `messages` jsonl to add to SFT."
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="With the build step: print its commands instead of running them."
    )
    defaults = Recipe(out=Path("."))
    for name in (
        "tokenizer_ratio",
        "pretrain_ratio",
        "min_score",
        "max_score",
        "sft_multi_turn_ratio",
        "val_fraction",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in (
        "sft_samples",
        "sft_max_seq_len",
        "sft_min_chars",
        "sft_max_chars",
        "vocab_size",
        "seed",
        "rows_per_file",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    # checked before any download: a bad value used to fail after it, or (--rows-per-file 0) fill the disk
    for name in ("tokenizer_ratio", "pretrain_ratio"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in (0, 1]")
    for name in ("sft_multi_turn_ratio", "val_fraction"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in [0, 1)")
    for name in ("rows_per_file", "sft_max_seq_len", "sft_max_chars", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("sft_samples", "sft_min_chars", "seed"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must not be negative")
    if args.min_score > args.max_score:
        parser.error(f"--min-score {args.min_score} is above --max-score {args.max_score}")
    if args.dry_run and args.step != "build":  # the download step has no dry run: it would fetch tens of GB
        parser.error(f"--dry-run prints the build step's commands: use `build --dry-run`, not `{args.step}`")
    return args


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    args = parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k in Recipe.__dataclass_fields__}
    recipe = Recipe(**options)
    from minillm.errors import UserError

    if not args.dry_run:
        try:
            recipe.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"error: --out {recipe.out}: cannot create it ({err.strerror or err})", file=sys.stderr)
            return 2

    stats: dict = {}
    try:
        if args.step in ("download", "all"):
            stats.update(download(recipe, args.fineweb_files, args.deepctrl_file))
        if args.step in ("build", "all"):
            missing = [p for p in RAW_OUTPUTS if not (recipe.raw / p).exists()]
            if missing and not args.dry_run:
                raise UserError(f"{recipe.raw} lacks {', '.join(missing)}; run the download step first")
            stats["commands"] = [["minillm", *c] for c in build(recipe, args.dry_run)]
    except ConnectionError as err:
        hint = "no hub access? pass local copies with --fineweb-files and --deepctrl-file"
        print(f"error: {err}; {hint}", file=sys.stderr)
        return 2
    except (UserError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.dry_run:
        write_record(recipe, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
