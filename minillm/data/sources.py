"""Reading raw text and chat rows from parquet, jsonl, txt files, globs, or a HuggingFace dataset name.

Notable choices:
- Local files are streamed with `pyarrow` (parquet in record batches, only the needed column), so a multi-GB file
  never sits in memory and reading stays far faster than tokenizing.
- jsonl is read line by line with `json`: a bad line in a pretraining file is an error naming the file and line;
  SFT reading (`iter_json_rows`) instead reports bad lines so they can be skipped and counted.
- A `.txt` file holds documents separated by blank lines.
- An input that is not an existing path, has no glob characters and looks like `owner/name` is a HuggingFace
  dataset, read with `datasets.load_dataset(..., streaming=True)`. Offline, that fails with a message that says
  so and suggests a local path.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import UserError

# What each local file suffix holds, in any case: the one table `data pretrain`, `data sft`, `eval ppl` and
# `eval chat` read files by.
KIND_OF_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One input: a local file (`kind` parquet/jsonl/txt) or a HuggingFace dataset (`kind` hf, `name`)."""

    kind: str
    name: str  # a file path, or `owner/name[:config]` for HF

    @property
    def size_bytes(self) -> int:
        return os.path.getsize(self.name) if self.kind != "hf" else 0


TEXT_KINDS = ("parquet", "jsonl", "txt")  # what pretraining data and tokenizer training read
CHAT_KINDS = ("parquet", "jsonl")  # chats need fields: a .txt file has none


def suffixes_of(kinds: tuple[str, ...]) -> list[str]:
    """The file suffixes read as one of `kinds` (".json" is read as JSON Lines or as one JSON list)."""
    return [suffix for suffix, kind in KIND_OF_SUFFIX.items() if kind in kinds]


def local_source(path: str | os.PathLike, kinds: tuple[str, ...] = TEXT_KINDS, what: str = "") -> Source:
    """The source of one local file, its kind read from its suffix; a suffix outside `kinds` is one line naming
    the suffixes that are (prefixed with `what`, e.g. "--data ", where an option names the input)."""
    suffix = Path(path).suffix.lower()
    kind = KIND_OF_SUFFIX.get(suffix)
    if kind not in kinds:
        allowed = ", ".join(suffixes_of(kinds))
        raise UserError(f"{what}{path}: unsupported file type '{Path(path).suffix}' (use {allowed})")
    return Source(kind, str(path))


def under_local_directory(name: str) -> bool:
    """Whether `name` ("owner/dataset" in form) starts with a directory that exists here: then it is a mistyped
    local path (`corpus/train` for `corpus/train.jsonl`), not a Hugging Face dataset to look up for half a minute."""
    head = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(os.path.expanduser(head))


def resolve_inputs(
    inputs: list[str] | str, kinds: tuple[str, ...] = TEXT_KINDS, flag: str = "--input"
) -> list[Source]:
    """Expand files, directories and globs (sorted) into sources of `kinds`; HF names pass through. A directory
    contributes its files of those kinds; a file or glob match of another kind is an error naming it. `flag` is the
    command's option for them, named in the errors."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    if not inputs:
        raise UserError(f"no input given (pass {flag} FILE, a glob, or a HuggingFace dataset name)")
    sources: list[Source] = []
    for item in inputs:
        item = str(item)
        if any(ch in item for ch in "*?[") and not os.path.exists(item):  # `corpus[2024].jsonl` is a file
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{item}: the glob matches no files")
            sources.extend(local_source(p, kinds) for p in matches)
        elif os.path.isdir(item):
            matches = _data_files_under(Path(item), suffixes_of(kinds))
            if not matches:
                raise UserError(f"{item}: the directory holds no {', '.join(suffixes_of(kinds))} files")
            sources.extend(local_source(p, kinds) for p in matches)
        elif os.path.isfile(item):
            sources.append(local_source(item, kinds))
        elif (
            _HF_NAME.match(item)
            and not item.startswith((".", "/"))
            and Path(item).suffix.lower() not in KIND_OF_SUFFIX
            and not under_local_directory(item)
        ):
            check_on_hub(item, flag)
            sources.append(Source("hf", item))
        else:
            raise UserError(f"{item}: no such file")
    return _read_once(sources)


def _read_once(sources: list[Source]) -> list[Source]:
    """`sources` with a file named twice (`--input a.jsonl --input '*.jsonl'`) kept once, with a note: read twice,
    its documents would be trained twice, and with a validation split the same text would land in train and val."""
    seen: dict[str, Source] = {}
    repeated: list[str] = []
    for source in sources:
        key = os.path.realpath(source.name) if source.kind != "hf" else source.name
        if key in seen and source.name not in repeated:
            repeated.append(source.name)
        seen.setdefault(key, source)
    for name in repeated:
        print(f"note: {name} is given more than once; it is read once", file=sys.stderr)
    return list(seen.values())


def _data_files_under(directory: Path, suffixes: list[str]) -> list[str]:
    """The files with one of `suffixes` under `directory`, sorted, leaving out hidden files and folders (`.git`, a build's
    temporary) and the data directories minillm built (data written beside its own input: their manifest.json
    would otherwise be read as text by the next build)."""
    built = {manifest.parent for manifest in directory.rglob("manifest.json") if _minillm_manifest(manifest)}
    files = []
    for path in directory.rglob("*"):
        inner = path.relative_to(directory).parts
        if (
            path.is_file()
            and path.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in inner)
            and not any(parent in built for parent in path.parents)
        ):
            files.append(str(path))
    return sorted(files)


def _minillm_manifest(path: Path) -> bool:
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("format", "")).startswith("minillm-")
    except (OSError, ValueError, AttributeError):
        return False


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:
        raise UserError(f"{path}: cannot read as parquet ({str(err).splitlines()[0]})") from None


def parquet_columns(path: str) -> list[str]:
    return list(_parquet_file(path).schema_arrow.names)


def _check_column(path: str, column: str, columns: list[str]) -> None:
    if column not in columns:
        found = ", ".join(columns) if columns else "none"
        raise UserError(f"{path}: no column '{column}' (columns found: {found}); pick one with --text-column")


def _hf_dataset(name: str):
    """Open a HuggingFace dataset in streaming mode, or explain why it cannot be reached."""
    import datasets

    repo, _, config = name.partition(":")
    try:
        return datasets.load_dataset(repo, config or None, split="train", streaming=True)
    except Exception as err:  # connection errors come wrapped in many types; report the first line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{name}: cannot load the HuggingFace dataset ({first}); offline? {hub_hint()}") from None


LOCAL_DATA = "a local file, directory or glob"  # what the data commands take instead of a Hub dataset name


def hub_hint(flag: str | None = None, local: str = LOCAL_DATA) -> str:
    """What to do when a dataset cannot be read from the Hub: download it and give its local copy (to `flag`)."""
    return f"download it (e.g. `hf download --repo-type dataset ...`) and pass {local} " + (
        f"to {flag}" if flag else "instead"
    )


def hub_offline() -> bool:
    """Whether the environment puts the Hub libraries in offline mode (they then read only their local caches)."""
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def check_on_hub(name: str, flag: str = "--input", local: str = LOCAL_DATA) -> None:
    """`UserError` unless the dataset `name` (`owner/dataset[:config]`) can be read from the Hub: checked with
    one quick request when the inputs are resolved, before any work. `load_dataset` itself would retry an
    unreachable Hub or a missing dataset for half a minute, logging every retry. The errors name `flag`, the
    command's option for the data, and `local`, what it takes instead of a dataset name."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = name.partition(":")[0]
    if hub_offline():
        raise UserError(f"{name}: cannot reach the HuggingFace Hub (offline mode is set); {hub_hint(flag, local)}")
    try:
        HfApi().dataset_info(repo, timeout=15)
    except RepositoryNotFoundError:
        raise UserError(f"{name}: no such dataset on the HuggingFace Hub (a private one needs `hf auth login`); "
                        f"for local data pass {local} to {flag}") from None
    except Exception as err:  # connection and HTTP errors come in many types; report the first line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{name}: cannot reach the HuggingFace Hub ({first}); offline? {hub_hint(flag, local)}"
        ) from None


def iter_text_batches(
    source: Source,
    text_column: str = "text",
    batch_size: int = 1024,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[list[str]]:
    """Yield lists of documents (strings) from `source`; empty documents are skipped.

    `on_bytes(n)` is called as the file is consumed (n = bytes of the file read since the last call, estimated
    from the row count for parquet), which drives progress bars in MB/s.
    """
    report = on_bytes or (lambda n: None)
    if source.kind == "parquet":
        pf = _parquet_file(source.name)
        _check_column(source.name, text_column, list(pf.schema_arrow.names))
        import pyarrow.types as pa_types

        kind = pf.schema_arrow.field(text_column).type
        values = kind.value_type if pa_types.is_dictionary(kind) else kind  # pandas' `category` columns
        if not (pa_types.is_string(values) or pa_types.is_large_string(values)):
            raise UserError(f"{source.name}: column '{text_column}' holds {kind}, not text; pick one with "
                            "--text-column")
        size, rows = source.size_bytes, max(pf.metadata.num_rows, 1)
        try:
            for batch in pf.iter_batches(batch_size=batch_size, columns=[text_column]):
                report(size * batch.num_rows // rows)
                texts = [t for t in batch.column(0).to_pylist() if t and not t.isspace()]
                if texts:
                    yield texts
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{source.name}: cannot read as parquet ({str(err).splitlines()[0]})") from None
    elif source.kind == "jsonl":
        yield from _batches(_jsonl_documents(source.name, text_column, report), batch_size)
    elif source.kind == "txt":
        yield from _batches(_txt_documents(source.name, report), batch_size)
    elif source.kind == "hf":
        yield from _batches(_hub_documents(source.name, text_column), batch_size)
    else:  # pragma: no cover - Source kinds are closed
        raise ValueError(source.kind)


def _batches(documents: Iterator[str], batch_size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _jsonl_documents(path: str, text_column: str, report: Callable[[int], None]) -> Iterator[str]:
    """The non-blank `text_column` of each row of a jsonl (or JSON array) file; a bad row is an error naming its
    line."""
    for lineno, row, error in iter_json_rows(path, report):
        if error is not None:
            raise UserError(f"{path}:{lineno}: {error}")
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(row), "a number")
            raise UserError(f"{path}:{lineno}: the row is {kind}, not an object with a '{text_column}' field")
        if text_column not in row:
            raise UserError(f"{path}:{lineno}: no field '{text_column}' (fields found: {', '.join(row)})")
        text = _document(row[text_column], f"{path}:{lineno}", f"field '{text_column}'")
        if text is not None:
            yield text


def _hub_documents(name: str, text_column: str) -> Iterator[str]:
    """The non-blank `text_column` of each row of a Hugging Face dataset, streamed."""
    for row in _hf_dataset(name):
        if text_column not in row:
            raise UserError(f"{name}: no column '{text_column}' (columns found: {', '.join(row)})")
        text = _document(row[text_column], name, f"column '{text_column}'")
        if text is not None:
            yield text


def _document(text: object, where: str, what: str) -> str | None:
    """A row's text as a document: None when it is null or blank (no document), a `UserError` naming `where` and
    `what` when it is a number or a list (the wrong field)."""
    if text is not None and not isinstance(text, str):
        kind = what.split()[0]  # "field" or "column"
        raise UserError(f"{where}: {what} is {type(text).__name__}, not text; pick the text {kind} with --text-column")
    return text if text and not text.isspace() else None


def _txt_documents(path: str, report: Callable[[int], None]) -> Iterator[str]:
    """The documents of a `.txt` file, read line by line (a file of any size in little memory): runs of lines
    separated by blank (or whitespace-only) lines, each keeping its first line's indentation (poems, code)."""
    lines: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            report(len(raw))
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: a byte-order mark is not text
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip()
                lines = []
    if lines:
        yield "".join(lines).rstrip()


def iter_json_rows(
    path: str, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line number, parsed row or None, error or None) for each non-empty line of a jsonl file.

    A file whose text starts with `[` is one JSON array of rows (how Alpaca-style `.json` datasets ship): its rows
    are yielded with their index (from 1) in place of a line number.
    """
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot open ({err.strerror})") from None
    with f:
        bom = len(_BOM) if f.read(len(_BOM)) == _BOM else 0  # a byte-order mark is not JSON
        f.seek(bom)
        if f.read(4096).lstrip().startswith(b"["):
            f.seek(bom)
            yield from _json_array_rows(path, f.read(), on_bytes)
            return
        f.seek(bom)
        for lineno, line in enumerate(f, 1):
            if on_bytes is not None:
                on_bytes(len(line))
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError:
                yield lineno, None, "not UTF-8 text"
            except json.JSONDecodeError as err:
                # a first line that is not JSON is most often a whole-file object (a config, a pretty-printed row)
                hint = "; expected one JSON row per line or one array of rows" if lineno == 1 else ""
                yield lineno, None, f"bad JSON ({err.msg} column {err.colno}){hint}"
            else:
                yield lineno, row, _unicode_error(row) if _may_hold_surrogate(line) else None


_BOM = b"\xef\xbb\xbf"


_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # a surrogate written as UTF-8 bytes (CESU-8 / WTF-8 dumps)


def _may_hold_surrogate(raw: bytes) -> bool:
    """Whether raw JSON may decode to a surrogate: a `\\ud..`/`\\uD..` escape, or one written out as bytes, which
    `json.loads` of bytes lets through (it decodes with surrogatepass). Rows without either skip the check (a few
    searches, no copy of the line: this runs on every line of a pretraining corpus)."""
    return b"\\ud" in raw or b"\\uD" in raw or _RAW_SURROGATE.search(raw) is not None


def _unicode_error(value) -> str | None:
    """What is wrong with the strings of a parsed JSON value that hold an unpaired surrogate escape (`"\\ud800"`,
    common in crawled text): such a string is not Unicode text, and the tokenizer fails on it. None when fine."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"text holds an unpaired surrogate (\\u{ord(value[err.start]):04x}), which is not valid Unicode"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((error for item in items if (error := _unicode_error(item)) is not None), None)


def _json_array_rows(path: str, data: bytes, on_bytes: Callable[[int], None] | None):
    try:
        rows = json.loads(data)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if on_bytes is not None:
        on_bytes(len(data))
    if not isinstance(rows, list):
        raise UserError(f"{path}: a JSON {type(rows).__name__}, expected an array of rows or one row per line")
    check_unicode = _may_hold_surrogate(data)
    for index, row in enumerate(rows, 1):
        yield index, row, _unicode_error(row) if check_unicode else None


def iter_rows(
    source: Source, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[str, object, str | None]]:
    """Yield (location, row dict or None, error or None) from any source (used for chat data). `on_bytes(n)` is
    called as the file is consumed, as in `iter_text_batches`, so a progress bar moves within a large file."""
    if source.kind == "jsonl":
        for lineno, row, err in iter_json_rows(source.name, on_bytes):
            yield f"{source.name}:{lineno}", row, err
    elif source.kind == "parquet":
        pf = _parquet_file(source.name)
        index = 0
        size, total_rows = source.size_bytes, max(pf.metadata.num_rows, 1)
        for batch in pf.iter_batches(batch_size=1024):
            if on_bytes is not None:
                on_bytes(size * batch.num_rows // total_rows)
            for row in batch.to_pylist():
                index += 1
                yield f"{source.name}:row {index}", row, None
    elif source.kind == "hf":
        for index, row in enumerate(_hf_dataset(source.name), 1):
            yield f"{source.name}:row {index}", row, None
    else:
        raise UserError(f"{source.name}: chat data must be .jsonl or .parquet")
