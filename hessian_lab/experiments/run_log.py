"""Append-only metric logs written twice, as JSON Lines and as CSV, and truncatable for resume.

A run killed mid-epoch leaves step records written after its last checkpoint. The checkpoint stores
the byte size of every log file at the moment it was taken (:meth:`MetricLog.sizes`); on resume the
files are cut back to those sizes (:meth:`MetricLog.truncate`), so the resumed run's logs are the
same lines as an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricLog", "read_jsonl"]


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings that float() reads back.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricLog:
    """One stream of records (e.g. per step) written to ``<stem>.jsonl`` and ``<stem>.csv``.

    Args:
        folder: Run folder.
        stem: File name without extension (``"steps"``, ``"epochs"``).
        columns: CSV columns, in order; every record must provide exactly these keys.
    """

    def __init__(self, folder: str | Path, stem: str, columns: Sequence[str]) -> None:
        self.jsonl_path = Path(folder) / f"{stem}.jsonl"
        self.csv_path = Path(folder) / f"{stem}.csv"
        self.columns = list(columns)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        if new_csv:
            self._csv.write(",".join(self.columns) + "\n")
            self._csv.flush()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to both files and flush (a killed run loses at most one line)."""
        if list(record) != self.columns:
            raise ValueError(f"record keys {list(record)} differ from the columns {self.columns}")
        self._jsonl.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([record[c] for c in self.columns])
        self._csv.write(buf.getvalue())
        self._jsonl.flush()
        self._csv.flush()

    def sizes(self) -> dict[str, int]:
        """Current byte sizes of both files (stored in checkpoints)."""
        self._jsonl.flush()
        self._csv.flush()
        return {"jsonl": self.jsonl_path.stat().st_size, "csv": self.csv_path.stat().st_size}

    def close(self) -> None:
        """Close both files."""
        self._jsonl.close()
        self._csv.close()

    @staticmethod
    def truncate(folder: str | Path, stem: str, sizes: dict[str, int]) -> None:
        """Cut ``<stem>.jsonl`` / ``<stem>.csv`` back to ``sizes`` (from :meth:`sizes`)."""
        for ext, size in sizes.items():
            path = Path(folder) / f"{stem}.{ext}"
            if path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as f:
                    f.truncate(size)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file into a list of dictionaries (a torn last line is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed while writing leaves at most one partial final line
    return rows
