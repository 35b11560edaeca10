"""`onnxpipe batch`: a pipeline over every row of a JSONL, CSV or Parquet file, written to a new file.

Each input row comes out once, in input order, with two columns added: `output`, the pipeline's result for
the row's input column as JSON text (what `onnxpipe serve` answers for it), and `error`, why the row has no
output (no value, empty, wrong type, too long; null or empty when it has one). A bad row never fails the job.
The output file appears only when complete: it is written beside its final name, then renamed.

Rows are labelled in chunks of `batch_size` rows (each chunk one list call, PIPELINE_BATCH_SIZE inputs per model
call) by a RowLabeller, in this process or (with a Ray address) on Ray
Data actors (onnxpipe.ray.data). Both cut the rows into the same chunks and label each chunk with the same
calls, so both write the same file.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT, ERROR = "output", "error"
# Inputs per model call within a chunk, as the server's default --max-batch-size. Larger batches ran slower per row
# on one CPU thread (BERT-small, length-sorted rows: 480 rows/s at 4, 380-400 at 8-16, 317 at 32, 272 at 64).
PIPELINE_BATCH_SIZE = 8
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class RowLabeller:
    """One pipeline and its call options; `label(values)` -> (output JSON, error) per value, never raising for a
    bad value. Shared by the single process, Ray Data's actors (Predictor) and so by every front end."""

    def __init__(self, pipe, parameters: dict | None = None, column: str = "text"):
        self.pipe = pipe
        self.column = column
        parameters = dict(parameters or {})
        if pipe.takes_batch_size:  # the rows of a chunk go to the model PIPELINE_BATCH_SIZE at a time (-o batch_size=N)
            parameters.setdefault("batch_size", PIPELINE_BATCH_SIZE)
        self.options = pipe.check_parameters(parameters)  # a bad option fails the job at once, not every row

    def label(self, values: list) -> list[tuple[str | None, str | None]]:
        from onnxpipe.results_json import result_json

        answers: list = [None] * len(values)
        good, lengths = {}, {}   # row -> its RequestInputs, its length in tokens
        for i, value in enumerate(values):
            inputs, problem, n = self.check(value)
            if problem is None:
                good[i], lengths[i] = inputs, n
            else:
                answers[i] = (None, problem)
        # shortest first: a batch pads to its longest row, and mixed lengths would pad most rows to twice their
        # length (measured on BERT-small: 3.2 ms a row in batches of 64 as they come, 2.0 sorted)
        good = dict(sorted(good.items(), key=lambda item: lengths[item[0]]))
        if good:
            try:  # the rows as one list call: the pipeline batches them
                output = self.pipe.run([values[i] for i in good], self.options)
                results = self.pipe.results_per_item(output, len(good))
            except Exception:  # noqa: BLE001 - one row broke the call: each row alone, each its own error
                results = None
            for k, (i, inputs) in enumerate(good.items()):
                try:
                    # what the row alone returns, as a server answers a request of one input
                    result = self.pipe.answer(inputs, self.options, [results[k]]) if results is not None \
                        else self.pipe.run(values[i], self.options)
                    answers[i] = (result_json(result), None)
                except Exception as e:  # noqa: BLE001 - said in the row's error field
                    answers[i] = (None, _reason(e))
        return answers

    def check(self, value):
        """(the value as one request's inputs, None, its length), or (None, why it cannot be labelled, None). The
        length is in tokens where the pipeline measures it, else in characters of its text."""
        from onnxpipe.base import InputError

        where = f"column {self.column!r}"
        if value is None:
            return None, f"{where} has no value", None
        if isinstance(value, str) and not value.strip():
            return None, f"{where} is empty", None
        try:
            inputs = self.pipe.split_inputs(value, where=where)
            if inputs.is_list:
                return None, f"{where} holds a list: a row holds one input", None
            n = self.pipe.check_input_length(value, self.options, where=where)
        except (InputError, ValueError, TypeError) as e:
            return None, str(e), None
        return inputs, None, n if n is not None else len(json.dumps(value))


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: {e}"


# -- files --------------------------------------------------------------------------------------------------------


def file_format(path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: not a file onnxpipe batch reads or writes (by its extension: "
                         f"{', '.join(sorted(FORMATS))})")
    return fmt


@dataclass
class Table:
    rows: list[dict]
    columns: list[str]
    schema: object = None   # Parquet: the input's pyarrow schema (kept in the output)


def read_table(path) -> Table:
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no input file {path}")
    if fmt == "parquet":
        pq = _pyarrow_parquet()
        table = pq.read_table(path)
        return Table(table.to_pylist(), list(table.column_names), table.schema)
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return Table(rows, list(reader.fieldnames or []))
    rows, columns = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # a blank line is not a row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a line must be a JSON object, not {type(row).__name__}")
            rows.append(row)
            columns.update(dict.fromkeys(row))
    return Table(rows, list(columns))


def write_table(path, table: Table, answers) -> int:
    """The input rows with `output` and `error` added, written atomically; answers: (output, error) per row, in
    order (an iterator: the file is written as they come). Returns the rows written."""
    path = Path(path)
    fmt = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        n = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[fmt](tmp, table, answers)
        if n != len(table.rows):
            raise RuntimeError(f"{n} of {len(table.rows)} rows came back: the output is not written")
        os.replace(tmp, path)
        return n
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _labelled(table: Table, answers):
    for row, (output, error) in zip(table.rows, answers):
        yield {**row, OUTPUT: output, ERROR: error}


def _write_jsonl(tmp, table, answers) -> int:
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in _labelled(table, answers):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_csv(tmp, table, answers) -> int:
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*table.columns, OUTPUT, ERROR])
        writer.writeheader()
        for row in _labelled(table, answers):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
            n += 1
    return n


def _write_parquet(tmp, table, answers, row_group: int = 10_000) -> int:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    schema, as_json = _parquet_schema(pa, table)
    n, chunk = 0, []
    with pq.ParquetWriter(tmp, schema) as writer:
        for row in _labelled(table, answers):
            n += 1
            for column in as_json:
                if row.get(column) is not None:
                    row[column] = json.dumps(row[column], ensure_ascii=False)
            chunk.append(row)
            if len(chunk) == row_group:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                chunk = []
        if chunk:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
    return n


def _parquet_schema(pa, table: Table):
    """The output's schema: a Parquet input's own plus `output` and `error` (strings). From JSONL or CSV, each
    column's type as pyarrow infers it over all rows; a column whose rows hold different JSON types (a number in a
    text column) is written as JSON text. Returns (schema, the columns written as JSON text)."""
    added = [pa.field(OUTPUT, pa.string()), pa.field(ERROR, pa.string())]
    if table.schema is not None:
        return pa.schema([*table.schema, *added], metadata=table.schema.metadata), set()
    fields, as_json = [], set()
    for column in table.columns:
        try:
            kind = pa.array([row.get(column) for row in table.rows]).type
            if pa.types.is_null(kind):
                kind = pa.string()
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            kind = pa.string()
            as_json.add(column)
        fields.append(pa.field(column, kind))
    return pa.schema([*fields, *added]), as_json


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet files need pyarrow: pip install pyarrow (the `ray` extra has it)") from None
    return pq


# -- the job ------------------------------------------------------------------------------------------------------


def chunks(values: list, size: int) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)]


def run_batch(model: str, input_path, output_path, column: str = "text", *, task: str | None = None,
              precision: str | None = None, device: str | None = None, batch_size: int = 64,
              parameters: dict | None = None, ray_address: str | None = None, actors: int = 2,
              cpus_per_actor: float = 1, progress: bool = True) -> dict:
    """Label `column` of every row of input_path into output_path (same or another format, by extension).
    Returns counts: rows, labelled, errors, seconds."""
    from onnxpipe.base import check_batch_size

    batch_size = check_batch_size(batch_size)
    file_format(output_path)  # a wrong output name fails before any work
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError("the output file must not be the input file")
    table = read_table(input_path)
    for name in (OUTPUT, ERROR):
        if name in table.columns:
            raise ValueError(f"the input already has a column named {name!r}, which onnxpipe batch adds: rename it")
    if table.rows and column not in table.columns:
        raise ValueError(f"the input has no column {column!r}: its columns are {', '.join(table.columns)}")
    values = [row.get(column) for row in table.rows]
    pieces = chunks(values, batch_size)
    t0 = time.perf_counter()
    if ray_address is None:
        from onnxpipe import pipeline

        labeller = RowLabeller(pipeline(task, model=model, precision=precision or "fp32", device=device), parameters,
                               column)
        results = (labeller.label(piece) for piece in pieces)
    else:
        from onnxpipe.ray.data import label_chunks

        results = label_chunks(pieces, model, column=column, address=ray_address, actors=actors,
                               cpus_per_actor=cpus_per_actor, task=task, precision=precision, device=device,
                               parameters=parameters)
    counts = {"errors": 0}
    meter = _Progress(len(values), sys.stderr if progress else None)

    def answers():
        for labelled in results:
            for answer in labelled:
                counts["errors"] += answer[1] is not None
                yield answer
            meter.advance(len(labelled))

    n = write_table(output_path, table, answers())
    meter.close()
    seconds = time.perf_counter() - t0
    return {"rows": n, "labelled": n - counts["errors"], "errors": counts["errors"], "seconds": round(seconds, 3)}


class _Progress:
    """Rows done, rows/s and time left on one stderr line (redrawn on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, stream):
        self.total, self.stream, self.done, self.t0, self.shown = total, stream, 0, time.perf_counter(), -1

    def advance(self, n: int) -> None:
        self.done += n
        if self.stream is None:
            return
        tty = self.stream.isatty()
        decile = self.done * 10 // max(self.total, 1)
        if not tty and decile == self.shown:
            return
        self.shown = decile
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = f"{self.done}/{self.total} rows, {rate:.0f} rows/s, {left:.0f} s left"
        self.stream.write(("\r" + line) if tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.stream.isatty():
            self.stream.write("\n")
