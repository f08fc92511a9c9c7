"""Raw labelled text -> a checked `LabelledTexts`.

Reads JSONL, CSV or Parquet files with a `text` and a `label` column (and an optional `domain`), or a
Hugging Face datasets name when the user is online. Every problem is reported with the file and row.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_CORPUS = "default"  # the multi-kind corpus shipped inside the package (data/corpus.jsonl)


class DataError(ValueError):
    """Input data that cannot be used; the message says what is wrong and where."""


QUOTE_CHARS = 200  # of a user's value, at most, in any message or report


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """A user's value as a message shows it: repr, cut to `limit` characters with the full length said."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def normalised(text: str) -> str:
    """What counts as the same text: case and runs of spaces aside."""
    return " ".join(text.lower().split())


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def visible(text: str) -> bool:
    """Whether a text has a character a reader sees (not only spaces, control or zero-width characters)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


def text_problem(text, what: str = "the text") -> str | None:
    """What makes a value unusable as a text, or None (`what` names it in the message)."""
    if _missing(text):
        return "missing text"
    if not isinstance(text, str):
        return f"{what} must be a string, got {type(text).__name__} {quote(text, 60)}"
    if not visible(text):
        return "empty text (only spaces, control or zero-width characters)"
    return None


def row_problem(text, label) -> str | None:
    """What makes one labelled row unusable, or None. The one row rule: `load_labelled` stops at the first
    row it names, the validation suite reports every such row."""
    if problem := text_problem(text):
        return problem
    if _missing(label) or (isinstance(label, str) and not label.strip()):
        return "missing label"
    if not isinstance(label, str | int | np.integer) or isinstance(label, bool):
        return f"the label must be a string or an integer, got {type(label).__name__} {quote(label, 60)}"
    return None


# Above this share of rows whose text is their label, the text column looks like a copy of the labels. Real sets
# have some: COVID-vaccine intents names each class by its canonical question, also one of its examples (3%).
MOST_TEXTS_ARE_LABELS = 0.5


def texts_that_are_labels(texts: list[str], labels: list[str]) -> list[int]:
    """Positions whose text is its own label ('maybe' labelled maybe happens; many such rows do not)."""
    return [i for i, (t, lab) in enumerate(zip(texts, labels, strict=True)) if normalised(t) == normalised(lab)]


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    domains: list[str] | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.domains is not None and len(self.domains) != len(self.texts):
            raise DataError(f"{self.source}: {len(self.texts)} texts but {len(self.domains)} domains")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def indices_by_class(self) -> dict[str, np.ndarray]:
        by: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            by.setdefault(label, []).append(i)
        return {label: np.asarray(by[label]) for label in sorted(by)}

    def domain_of_class(self) -> dict[str, str]:
        if self.domains is None:
            raise DataError(f"{self.source}: has no 'domain' column, so it cannot be split by domain")
        mapping: dict[str, str] = {}
        for label, domain in zip(self.labels, self.domains, strict=True):
            if mapping.setdefault(label, domain) != domain:
                raise DataError(f"{self.source}: class {quote(label, 80)} appears in two domains "
                                f"({quote(mapping[label], 60)}, {quote(domain, 60)})")
        return mapping

    def select(self, keep: np.ndarray | list[int]) -> LabelledTexts:
        keep = list(keep)
        return LabelledTexts(
            texts=[self.texts[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            domains=None if self.domains is None else [self.domains[i] for i in keep],
            source=self.source,
        )

    def with_classes(self, classes: list[str] | set[str]) -> LabelledTexts:
        wanted = set(classes)
        return self.select([i for i, label in enumerate(self.labels) if label in wanted])


def shared_texts(first: LabelledTexts, second: LabelledTexts) -> list[str]:
    """Texts (normalised) in both sets: examples that would leak from one split into another."""
    return sorted({normalised(t) for t in first.texts} & {normalised(t) for t in second.texts})


def default_corpus_path() -> Path:
    return Path(str(resources.files("metanlp.data") / "default_corpus" / "corpus.jsonl"))


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 file, streamed; a BOM is not data."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
            if line.strip():
                yield number, line


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _text_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _read_jsonl(path: Path) -> pd.DataFrame:
    return pd.DataFrame([{**row, "_line": number} for number, row in _jsonl_objects(path)])


@contextmanager
def _csv_errors(path: Path, suffix: str) -> Iterator[None]:
    """pandas' CSV/TSV errors as the project's, naming the file."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: empty file") from err
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: cannot parse as {suffix[1:].upper()}: {quote(str(err), 160)}") from err


def _read_csv(path: Path, suffix: str, **options):
    return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                       encoding="utf-8-sig", **options)


TABLE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")


def _data_file(path: Path, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> str:
    """The suffix of a data file that can be read; a missing file, a folder or an unknown type is refused."""
    kinds = ", ".join(s for s in suffixes if s != ".ndjson")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a {kinds} file")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise DataError(f"{path}: unknown file type {quote(suffix, 40)}; use {kinds}")
    return suffix


def _first_bad_utf8_line(path: Path) -> str | None:
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not is_utf8(raw):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start} of the line)"
    return None


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file; the user needs the reason
        raise DataError(f"{path}: not a readable Parquet file ({quote(str(err), 120)})") from err


def _read_table(path: Path) -> pd.DataFrame:
    suffix = _data_file(path)
    if suffix in {".jsonl", ".ndjson"}:
        return _read_jsonl(path)
    if suffix in {".csv", ".tsv"}:
        if bad := _first_bad_utf8_line(path):
            raise DataError(bad)
        with _csv_errors(path, suffix):
            frame = _read_csv(path, suffix)
        frame["_line"] = np.arange(2, len(frame) + 2)  # line 1 is the header
        return frame
    frame = _read_parquet(path)
    frame["_line"] = np.arange(1, len(frame) + 1)
    return frame


def _read_hf(name: str, split: str) -> pd.DataFrame:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{name!r} is not a file; to load it from the Hugging Face hub install metanlp[hf]") from err
    try:
        frame = datasets.load_dataset(name, split=split).to_pandas()
    except Exception as err:  # the hub raises many types; the user needs the reason, not the type
        raise DataError(f"{name!r} is neither a file nor a loadable Hugging Face dataset: {err}") from err
    frame["_line"] = np.arange(1, len(frame) + 1)
    return frame


READER_COLUMNS = ("_line", "_utf8_valid", "_json_valid")  # what the readers add to a file's own columns


def rows_where_filtered(frame: pd.DataFrame, rows_where: dict[str, str | list[str]] | None, where: str
                        ) -> pd.DataFrame:
    """The rows whose column holds the given value, or one of the given values, for each column of
    `rows_where` (compared as text); a missing column or no row left is refused, naming `where`."""
    columns = [c for c in frame.columns if c not in READER_COLUMNS]
    for column, value in (rows_where or {}).items():
        if column not in frame.columns:
            raise DataError(f"{where}: no column {quote(column, 60)} to filter on; the columns are {quote(columns)}")
        allowed = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        frame = frame[frame[column].astype(str).isin(allowed)]
        if frame.empty:
            raise DataError(f"{where}: no row has {column} = {quote(value, 100)}")
    return frame


def load_labelled(
    source: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    domain_column: str = "domain",
    hf_split: str = "train",
    rows_where: dict[str, str | list[str]] | None = None,
    separate_tasks: bool = False,
    conflicting_labels: str = "refuse",
) -> LabelledTexts:
    """Load labelled texts from a file, the embedded default corpus ("default") or a HF dataset name.
    `rows_where`: keep only the rows whose column holds the given value, or one of the given values.
    `separate_tasks`: the domain column names tasks with label spaces of their own, so one text may have
    another label in another task (ARSC: a 4-star review is positive at threshold 2, negative at 5).
    `conflicting_labels`: "refuse" a text given two labels, or "drop" every row of such a text (a warning
    says how many)."""
    if str(source) == DEFAULT_CORPUS:
        source = default_corpus_path()
    path = Path(source)
    if path.exists():
        frame, where = _read_table(path), str(path)
    elif path.suffix.lower() in {".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".txt"}:
        raise DataError(f"{path}: no such file")  # a file name that is not there is a typo, not a hub name
    else:
        frame, where = _read_hf(str(source), hf_split), str(source)
    if frame.empty:
        raise DataError(f"{where}: no rows")
    frame = rows_where_filtered(frame, rows_where, where)
    columns = [c for c in frame.columns if c not in READER_COLUMNS]
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in frame.columns:
            raise DataError(f"{where}: no {role} column {quote(column, 60)}; the columns are {quote(columns)}")
    lines = frame["_line"].tolist()
    tasks = (frame[domain_column].astype(str).tolist() if separate_tasks and domain_column in frame.columns
             else [""] * len(frame))
    texts, labels, keys, first_seen, conflicting = [], [], [], {}, set()
    for line, text, label, task in zip(lines, frame[text_column].tolist(), frame[label_column].tolist(), tasks,
                                       strict=True):
        problem = row_problem(text, label)
        if problem:
            raise DataError(f"{where}:{line}: {problem}")
        text, label = text.strip(), str(label).strip()
        key = (task, normalised(text))
        earlier = first_seen.setdefault(key, (line, label))
        if earlier[1] != label:
            if conflicting_labels != "drop":
                raise DataError(f"{where}:{line}: the same text as line {earlier[0]} with another label "
                                f"({quote(label, 60)}, there {quote(earlier[1], 60)}): {quote(text, 80)}")
            conflicting.add(key)
        texts.append(text)
        labels.append(label)
        keys.append(key)
    if conflicting:
        keep = [i for i, key in enumerate(keys) if key not in conflicting]
        logging.getLogger(__name__).warning("%s: %d texts have two labels; their %d rows are dropped", where,
                                            len(conflicting), len(texts) - len(keep))
        frame, lines = frame.iloc[keep], [lines[i] for i in keep]
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    same = texts_that_are_labels(texts, labels)
    if len(same) > MOST_TEXTS_ARE_LABELS * len(texts):
        raise DataError(f"{where}: {len(same)} of {len(texts)} rows have their label as text (e.g. line "
                        f"{lines[same[0]]}: {quote(texts[same[0]], 60)}); are the text and label columns swapped?")
    domains = None
    if domain_column in frame.columns:
        domains = [str(d) for d in frame[domain_column].tolist()]
    return LabelledTexts(texts=texts, labels=labels, domains=domains, source=where)


def read_texts(source: str | Path, text_column: str = "text") -> list[str]:
    """Unlabelled texts: a .txt file (one per line) or the text column of a JSONL/CSV/TSV/Parquet file; blank
    rows are skipped."""
    path = _text_file(source)
    texts = [str(text).strip() for _, text in _iter_rows(path, path.suffix.lower(), text_column)
             if text is not None and str(text).strip()]
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def _text_file(source: str | Path) -> Path:
    path = Path(source)
    _data_file(path, (".txt", *TABLE_SUFFIXES))
    return path


def iter_text_batches(source: str | Path, text_column: str = "text",
                      batch_size: int = 256) -> Iterator[list[tuple[int, str]]]:
    """A file of texts to classify, streamed: batches of (line, text), never the whole file in memory.

    .txt: one text per line (blank lines skipped); .jsonl/.csv/.tsv/.parquet: the `text_column` of each row
    (for CSV and Parquet the line is the row number, the header being line 1 of a CSV). A row without a
    usable text stops the stream with its line: a scored file has a result for every row it was given."""
    path = _text_file(source)
    batch: list[tuple[int, str]] = []
    for line, text in _iter_rows(path, path.suffix.lower(), text_column):
        if problem := text_problem(text, quote(text_column, 60)):
            raise DataError(f"{path}:{line}: {problem}")
        batch.append((line, text.strip()))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _iter_rows(path: Path, suffix: str, column: str) -> Iterator[tuple[int, object]]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if column not in parquet.schema_arrow.names:
            raise DataError(f"{path}: no text column {column!r}; the columns are {parquet.schema_arrow.names}")
        line = 0
        for record_batch in parquet.iter_batches(columns=[column], batch_size=4096):
            for value in record_batch.column(0).to_pylist():
                line += 1
                yield line, value
        return
    if suffix in {".csv", ".tsv"}:
        with _csv_errors(path, suffix):
            line = 1
            for chunk in _read_csv(path, suffix, chunksize=4096):
                if column not in chunk.columns:
                    raise DataError(f"{path}: no text column {column!r}; the columns are {list(chunk.columns)}")
                for value in chunk[column].tolist():
                    line += 1
                    yield line, value
        return
    if suffix == ".txt":
        yield from _text_lines(path)
        return
    for number, row in _jsonl_objects(path):
        if column not in row:
            raise DataError(f"{path}:{number}: expected a JSON object with {column!r}")
        yield number, row[column]


def read_raw_rows(source: str | Path) -> pd.DataFrame:
    """Every row of a labelled file as it is, for validation: nothing is rejected here.

    Undecodable bytes become U+FFFD with `_utf8_valid` False, a JSONL line that is not a JSON object keeps
    its line number with `_json_valid` False, and `_line` is the row's line in the file, so a validation
    report can point at it. (`load_labelled` is the strict reader that stops at the first problem.)
    """
    path = default_corpus_path() if str(source) == DEFAULT_CORPUS else Path(source)
    suffix = _data_file(path)
    if suffix == ".parquet":
        frame = _read_parquet(path)
        frame["_line"], frame["_utf8_valid"], frame["_json_valid"] = np.arange(1, len(frame) + 1), True, True
        return frame
    rows = []
    raw_lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines()  # a UTF-8 BOM is not data
    if suffix in {".csv", ".tsv"}:
        import csv
        import io

        decoded = [(raw.decode("utf-8", errors="replace"), is_utf8(raw)) for raw in raw_lines]
        reader = csv.DictReader(io.StringIO("\n".join(text for text, _ in decoded)),
                                delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            number = reader.line_num  # the row's last physical line, header is line 1
            rows.append({**row, "_line": number, "_utf8_valid": decoded[number - 1][1], "_json_valid": True})
        if not rows:
            raise DataError(f"{path}: no rows")
        return pd.DataFrame(rows)
    for number, raw in enumerate(raw_lines, start=1):
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        valid = isinstance(row, dict)
        rows.append({**(row if valid else {}), "_line": number, "_utf8_valid": is_utf8(raw), "_json_valid": valid})
    if not rows:
        raise DataError(f"{path}: no rows")
    return pd.DataFrame(rows)


def is_utf8(raw: bytes) -> bool:
    """Whether a byte string decodes as UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
