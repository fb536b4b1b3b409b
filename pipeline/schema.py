"""The prepare step: validate and normalise prompt rows, giving each a stable key and seed.

:func:`prepare_batch` runs as ``map_batches(batch_format="pyarrow")`` on the reader's output. It never drops a
row: a row that breaks a rule keeps flowing with ``error`` set (the reason, quoting the offending value) and
``error_stage == "prepare"``, so that rows in == rows written + error rows. The columns it writes are always
non-null, so a rejected value survives only in the error message; every other column passes through untouched.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline import columns as C

PREPARE = "prepare"  # the error_stage of rows rejected here
READ = "read"  # the error_stage of rows whose data the reader could not decode (pipeline.reader)

SEED_LIMIT = 2**63  # seeds are non-negative int64
# An id used as a key verbatim: safe as a file-name stem everywhere (no '/', no '.'), and not starting with '-',
# which command-line tools would read as an option.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_SANITISED_STEM = 64
_ID_HASH = 12
# The keys the pipeline makes: derived ("<10 hex>-<9 digits>") and sanitised ("<stem>-<12 hex>"). Their last
# segments differ, so the two never meet; an id spelled like either is sanitised too, so that no id can take the
# key another row gets (which would leave one of them in neither metadata/ nor errors/). The keys of a row's extra
# images (:func:`sample_key`, "<key>-<12 digits>") have the sanitised shape, so no id is used as one verbatim either.
MADE_KEY = re.compile(r"[0-9a-f]{10}-[0-9]{9}|.*-[0-9a-f]{%d}" % _ID_HASH)
_SHOWN_CHARS = 100
_CONSUMED = (C.READ_ERROR, C.FIRST_HOLDER_SOURCE, C.FIRST_HOLDER_ROW)  # the reader's marks for prepare

# What prepare writes, in this order after the input's columns (a column already in the input is replaced in place).
_OUTPUT_TYPES = {
    C.KEY: pa.string(),
    C.SEED: pa.int64(),
    C.NEGATIVE_PROMPT: pa.string(),
    C.PRIOR_GUIDANCE_SCALE: pa.float64(),
    C.DECODER_GUIDANCE_SCALE: pa.float64(),
    C.ERROR: pa.string(),
    C.ERROR_STAGE: pa.string(),
}


def make_key(ident: object, source: str, source_row: int) -> str:
    """The row's key: from its id when it has one, else derived from where it was read.

    Raises ValueError, with a message for the user, for an id that cannot be a key (wrong type, empty).
    """
    if ident is None:
        return derive_key(source, source_row)
    return key_from_id(ident)


def key_from_id(ident: object) -> str:
    """A safe id as-is; any other id sanitised and suffixed with a hash of the original, so distinct ids stay
    distinct and no key can name a path outside the output folder. Ids shaped like the keys made here count as
    unsafe, which keeps ids, sanitised ids and derived keys in disjoint sets."""
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise ValueError(f"id must be a string or an integer, got {_show(ident)}")
    text = str(ident)
    if not text:
        raise ValueError("id is empty")
    if SAFE_ID.fullmatch(text) and not MADE_KEY.fullmatch(text):
        return text
    stem = _UNSAFE_CHAR.sub("_", text)[:_SANITISED_STEM]
    if stem.startswith("-"):
        stem = "_" + stem[1:]
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:_ID_HASH]}"


def row_key(ident: object, source: str, source_row: int) -> tuple[str, str | None]:
    """(key, None) for a usable id or none; (derived key, the reason) for an id that cannot be a key: the row
    still needs a unique key for the errors table."""
    try:
        return make_key(ident, source, source_row), None
    except ValueError as e:
        return derive_key(source, source_row), str(e)


# Where the first row with a key was read: (source, row index).
Origin = tuple[str, int]


def derive_key(source: str, source_row: int) -> str:
    """Key of a row without an id: a hash of its source file and its index there, stable across reruns as long
    as the input files keep their names and row order. Distinct files get distinct prefixes."""
    return f"{hashlib.sha256(source.encode()).hexdigest()[:10]}-{source_row:09d}"


def derive_seed(run_seed: int, key: str) -> int:
    """Seed of a row without one: a hash of the run seed and the key, so a rerun draws the same noise."""
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (SEED_LIMIT - 1)


def copy_seed(seed: int, index: int, name: str) -> int:
    """Seed of copy ``index`` of a row seeded ``seed``, ``name`` being the copy's key or id: copy 0 keeps the seed
    (its image is the one a single copy makes), the others derive theirs from it and the name. ``seed + index``
    would give rows seeded 1 and 2 the same noise for copies 1 and 0. Used by ``--images-per-prompt``
    (:func:`expand_samples`) and by sweeps' ``seeds_per_prompt``."""
    return seed if index == 0 else derive_seed(seed, name)


def sample_key(key: str, index: int) -> str:
    """Key of image ``index`` of the row keyed ``key``: the row's own key for image 0, so that one image per row is
    a plain run and a run with more images resumes its keys; ``<key>-<index as 12 digits>`` for the others. That
    is the shape of a sanitised key, which no id is used as verbatim (:func:`key_from_id`), so no input row can
    hold it; it meets a sanitised key only if that key's 48-bit hash happens to be the 12 digits."""
    return key if index == 0 else f"{key}-{index:0{_ID_HASH}d}"


def expand_samples(table: pa.Table, images_per_prompt: int) -> pa.Table:
    """Each row of a prepared batch as ``images_per_prompt`` adjacent rows, with :func:`sample_key` keys,
    :func:`copy_seed` seeds and a ``sample_index`` column (int32, 0-based). Error rows are copied too: every copy
    is a row of the output, written or an error, so rows in = written + errors + rejected counts copies. Each row
    expands on its own, so the copies do not depend on how rows were batched."""
    n = images_per_prompt
    take = pa.array(np.repeat(np.arange(table.num_rows, dtype=np.int64), n))
    index = np.tile(np.arange(n, dtype=np.int32), table.num_rows)
    out = table.take(take)
    keys = [sample_key(key, int(i)) for key, i in zip(out.column(C.KEY).to_pylist(), index)]
    seeds = [copy_seed(seed, int(i), key) for seed, i, key in zip(out.column(C.SEED).to_pylist(), index, keys)]
    out = out.set_column(out.schema.get_field_index(C.KEY), C.KEY, pa.array(keys, pa.string()))
    out = out.set_column(out.schema.get_field_index(C.SEED), C.SEED, pa.array(seeds, pa.int64()))
    return out.append_column(C.SAMPLE_INDEX, pa.array(index, pa.int32()))


def prepare_batch(
    table: pa.Table,
    *,
    run_seed: int,
    prior_guidance_scale: float,
    decoder_guidance_scale: float,
) -> pa.Table:
    """Add key, seed, negative_prompt, both guidance scales, error and error_stage to a reader batch.

    A row repeating the key of an earlier row of the batch, or marked by the reader as repeating an earlier row
    of the input (pipeline.duplicates, for repeats across batches), is an error row naming the first; it takes
    its derived key, which no id can be spelled as (:func:`key_from_id`), so keys stay unique across good and
    error rows. So is a row the reader could not decode, under its derived key (its values are all null).
    """
    n = table.num_rows
    given = (C.ID, C.SEED, C.NEGATIVE_PROMPT, C.PRIOR_GUIDANCE_SCALE, C.DECODER_GUIDANCE_SCALE)
    rows = zip(
        table.column(C.PROMPT).to_pylist(),
        table.column(C.SOURCE).to_pylist(),
        table.column(C.SOURCE_ROW).to_pylist(),
        *(table.column(name).to_pylist() if name in table.column_names else [None] * n
          for name in (*given, C.READ_ERROR, C.FIRST_HOLDER_SOURCE, C.FIRST_HOLDER_ROW)),
    )
    out: dict[str, list] = {name: [] for name in _OUTPUT_TYPES}
    used: dict[str, Origin] = {}
    for prompt, source, source_row, ident, seed, negative, prior, decoder, read_error, first_source, first_row in rows:
        reasons: list[str] = []
        if read_error is None:
            _check_prompt(prompt, reasons)
        else:  # nothing of the row was read, its values are null: its key is the derived one
            reasons.append(read_error)
        key, reason = row_key(ident, source, source_row)
        if reason:
            reasons.append(reason)
        elif read_error is None and (first := (first_source, first_row) if first_source is not None
                                     else used.get(key)):
            # The duplicate takes its derived key, so that keys stay unique across good and error rows.
            reasons.append(f"duplicate id {_show(ident)}: row {first[1]} of {first[0]!r} has the same key {key!r}")
            key = derive_key(source, source_row)
        used.setdefault(key, (source, source_row))
        values = (
            key,
            _seed(seed, run_seed, key, reasons),
            _negative_prompt(negative, reasons),
            _guidance(C.PRIOR_GUIDANCE_SCALE, prior, prior_guidance_scale, reasons),
            _guidance(C.DECODER_GUIDANCE_SCALE, decoder, decoder_guidance_scale, reasons),
        )
        error = "; ".join(reasons)
        stage = READ if read_error is not None else PREPARE if error else ""
        for name, value in zip(_OUTPUT_TYPES, (*values, error, stage)):
            out[name].append(value)
    for name, typ in _OUTPUT_TYPES.items():
        column = pa.array(out[name], typ)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, column) if index >= 0 else table.append_column(name, column)
    return table.drop_columns([c for c in _CONSUMED if c in table.column_names])


def _check_prompt(prompt: object, reasons: list[str]) -> None:
    if prompt is None:
        reasons.append("prompt is null")
    elif not isinstance(prompt, str):
        reasons.append(f"prompt must be a string, got {_show(prompt)}")
    elif not prompt:
        reasons.append("prompt is empty")
    elif prompt.isspace():
        reasons.append("prompt is only whitespace")


def _seed(value: object, run_seed: int, key: str, reasons: list[str]) -> int:
    if value is None:
        return derive_seed(run_seed, key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT:
        return value
    reasons.append(f"seed must be an integer in [0, 2**63), got {_show(value)}")
    return 0


def _negative_prompt(value: object, reasons: list[str]) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    reasons.append(f"{C.NEGATIVE_PROMPT} must be a string, got {_show(value)}")
    return ""


def _guidance(name: str, value: object, default: float, reasons: list[str]) -> float:
    if value is None:
        return float(default)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    reasons.append(f"{name} must be a finite number >= 0, got {_show(value)}")
    return float(default)


def _show(value: object) -> str:
    """The offending value for an error message, cut so that one bad cell cannot flood the errors table."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def prepare_and_skip(
    table: pa.Table, *, prepare: Callable[..., pa.Table] = prepare_batch, images_per_prompt: int = 1,
    **settings: Any
) -> pa.Table:
    """The prepare step (of prompts, or of images for variations), each row as ``images_per_prompt`` rows, less the
    images an earlier attempt committed (the reader skips rows all of whose images are: pipeline.coverage)."""
    table = prepare(table, **settings)
    if images_per_prompt > 1:
        done = table.column(C.DONE_SAMPLES).to_pylist()
        table = expand_samples(table.drop_columns([C.DONE_SAMPLES]), images_per_prompt)
        index = table.column(C.SAMPLE_INDEX).to_pylist()
        keep = [i not in done[row // images_per_prompt] for row, i in enumerate(index)]
        table = table.filter(pa.array(keep, pa.bool_()))
    return table


def with_row_problems(prepared: pa.Table, problems: list[str]) -> pa.Table:
    """``prepared`` with each row's problem ("" for none) added to its error, as a prepare-stage error; a row the
    reader could not decode keeps its read error alone (it has no values to complain of)."""
    errors = prepared.column(C.ERROR).to_pylist()
    stages = prepared.column(C.ERROR_STAGE).to_pylist()
    for i, problem in enumerate(problems):
        if problem and stages[i] != READ:
            errors[i] = f"{errors[i]}; {problem}" if errors[i] else problem
            stages[i] = PREPARE
    prepared = prepared.set_column(prepared.schema.get_field_index(C.ERROR), C.ERROR, pa.array(errors, pa.string()))
    return prepared.set_column(prepared.schema.get_field_index(C.ERROR_STAGE), C.ERROR_STAGE,
                               pa.array(stages, pa.string()))
