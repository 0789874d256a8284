"""Load a user's own interaction log from CSV or Parquet.

Errors name the file and the row so a bad export can be fixed by hand:
CSV rows are numbered as physical lines (the header is line 1), Parquet rows
as 1-based data rows.
"""

from __future__ import annotations

import csv
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .sources import Interactions


def parse_timestamp(text: str) -> float:
    """Numeric seconds, or ISO-8601 text (naive times are taken as UTC)."""
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value):
            raise ValueError(f"timestamp {text!r} is not finite")
        return value
    # Python < 3.11 fromisoformat rejects a trailing "Z".
    iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"cannot parse timestamp {text!r} (want seconds or ISO-8601)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _check_id(value, what: str) -> str:
    if value is None or str(value).strip() == "":
        raise ValueError(f"empty {what}")
    return str(value)


def _read_csv(path: Path, cols: tuple[str, str, str]):
    users, items, stamps = [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (no header line)")
        header = [h.strip() for h in header]
        for c in cols:
            if c not in header:
                raise ValueError(f"{path}: missing required column {c!r} (header: {header})")
        iu, ii, it = (header.index(c) for c in cols)
        for row in reader:
            if not row:  # blank line
                continue
            line = reader.line_num
            try:
                if len(row) <= max(iu, ii, it):
                    raise ValueError(f"row has {len(row)} fields, header has {len(header)}")
                users.append(_check_id(row[iu], f"{cols[0]!r}"))
                items.append(_check_id(row[ii], f"{cols[1]!r}"))
                stamps.append(parse_timestamp(row[it]))
            except ValueError as e:
                raise ValueError(f"{path}: line {line}: {e}") from None
    return users, items, stamps


def _parquet_seconds(column) -> list:
    """Timestamp column to float seconds; None marks a null, str is parsed later."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_timestamp(t):
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[t.unit]
        ints = pc.cast(column, pa.int64()).to_pylist()  # epoch units, UTC
        return [None if v is None else v / per_second for v in ints]
    if pa.types.is_date(t):
        days = pc.cast(pc.cast(column, pa.date32()), pa.int32()).to_pylist()
        return [None if v is None else v * 86400.0 for v in days]
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return [None if v is None else float(v) for v in column.to_pylist()]
    return column.to_pylist()


def _read_parquet(path: Path, cols: tuple[str, str, str]):
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    for c in cols:
        if c not in names:
            raise ValueError(f"{path}: missing required column {c!r} (columns: {names})")
    table = pq.read_table(path, columns=list(cols))
    u_col = table.column(cols[0]).to_pylist()
    i_col = table.column(cols[1]).to_pylist()
    t_col = _parquet_seconds(table.column(cols[2]))
    users, items, stamps = [], [], []
    for n, (u, i, t) in enumerate(zip(u_col, i_col, t_col), start=1):
        try:
            users.append(_check_id(u, f"{cols[0]!r}"))
            items.append(_check_id(i, f"{cols[1]!r}"))
            if t is None:
                raise ValueError(f"empty {cols[2]!r}")
            stamps.append(parse_timestamp(t) if isinstance(t, str) else float(t))
            if not math.isfinite(stamps[-1]):
                raise ValueError(f"timestamp {t!r} is not finite")
        except ValueError as e:
            raise ValueError(f"{path}: row {n}: {e}") from None
    return users, items, stamps


def load_user_log(path: str | os.PathLike, user_col: str = "user_id",
                  item_col: str = "item_id", time_col: str = "timestamp") -> Interactions:
    """Read a .csv or .parquet log into Interactions, keeping the file's row order."""
    path = Path(path)
    cols = (user_col, item_col, time_col)
    ext = path.suffix.lower()
    if ext == ".csv":
        users, items, stamps = _read_csv(path, cols)
    elif ext in (".parquet", ".pq"):
        users, items, stamps = _read_parquet(path, cols)
    else:
        raise ValueError(f"{path}: unsupported log format {ext!r} (want .csv or .parquet)")
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.array(stamps, dtype=np.float64))
