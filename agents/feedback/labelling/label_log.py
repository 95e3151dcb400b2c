"""The label log: one JSON line per answer or undo, appended and fsynced, never rewritten.

    {"pair_id": 7, "label": 1.0, "annotator": "alice", "time": 1712345678.9, "shown_left": 2}
    {"pair_id": 7, "undo": true, "annotator": "alice", "time": 1712345680.1}

`label` is always P(fragment 1 preferred): 1.0, 0.0, 0.5 (equally good) or null ("can't tell": the pair is dropped).
`shown_left` is the fragment (1 or 2) the page showed on the left; the left/right swap is undone before saving.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Label:
    pair_id: int
    label: float | None  # P(fragment 1 preferred): 1.0, 0.0, 0.5 (equally good); None = "can't tell" (pair dropped)
    annotator: str
    time: float  # unix time
    shown_left: int  # 1 or 2: which fragment the page showed on the left


def is_pair_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_record(line: str) -> Label | tuple[int, str] | None:
    """One log line -> a Label (an answer), (pair_id, annotator) (an undo), or None if the line is not a valid
    record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not is_pair_id(record.get("pair_id")):
        return None
    if not isinstance(record.get("annotator"), str) or not _is_time(record.get("time")):
        return None
    if record.get("undo") is True and set(record) == {"pair_id", "undo", "annotator", "time"}:
        return record["pair_id"], record["annotator"]
    if set(record) != {"pair_id", "label", "annotator", "time", "shown_left"}:
        return None
    label = record["label"]
    if label is not None and (isinstance(label, bool) or label not in (0.0, 0.5, 1.0)):
        return None
    if record["shown_left"] not in (1, 2) or isinstance(record["shown_left"], bool):
        return None
    return Label(
        pair_id=record["pair_id"],
        label=None if label is None else float(label),
        annotator=record["annotator"],
        time=float(record["time"]),
        shown_left=record["shown_left"],
    )


_BLANK = " \t\r"  # what a blank log line may hold besides its newline


def _complete_lines(path: pathlib.Path) -> tuple[list[str], int]:
    """The log's lines and the byte offset where its last non-blank line starts (the file's size if none)."""
    data = path.read_bytes()
    stripped = data.rstrip(_BLANK.encode() + b"\n")
    last_start = stripped.rfind(b"\n") + 1 if stripped else len(data)
    # Split on "\n" only (not str.splitlines, which also splits on other separators), so that line numbers and
    # last_start agree.
    return data.decode("utf-8", errors="replace").split("\n"), last_start


def _is_blank(line: str) -> bool:
    return not line.strip(_BLANK)


def load_label_log(path) -> dict[int, Label]:
    """The final answer per pair_id in the JSONL log at `path`, undos applied; a missing file gives {}.

    A corrupt last line (the process was killed mid-write) is skipped; any other malformed line, an undo of an
    unanswered pair or a second answer without an undo raises ValueError naming the file and the line number.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    lines, _ = _complete_lines(path)
    numbered = [(number, line) for number, line in enumerate(lines, 1) if not _is_blank(line)]
    answers: dict[int, Label] = {}
    for index, (number, line) in enumerate(numbered):
        record = _parse_record(line)
        if record is None:
            if index == len(numbered) - 1:
                log.warning("%s: skipping the truncated last line %d", path, number)
                break
            raise ValueError(f"{path}, line {number}: not a label record: {line[:200]!r}")
        if isinstance(record, Label):
            if record.pair_id in answers:
                raise ValueError(f"{path}, line {number}: pair {record.pair_id} answered again without an undo")
            answers[record.pair_id] = record
        else:
            pair_id, _ = record
            if answers.pop(pair_id, None) is None:
                raise ValueError(f"{path}, line {number}: undo of pair {pair_id}, which has no answer")
    return answers


def repair_log_tail(path: pathlib.Path) -> None:
    """Make the log safe to append to: cut a corrupt last line (a write the process was killed in the middle of,
    which load_label_log skips) and end the file with a newline, so the next record starts on a line of its own."""
    if not path.exists():
        return
    lines, last_start = _complete_lines(path)
    last = next((line for line in reversed(lines) if not _is_blank(line)), None)
    with open(path, "r+b") as file:
        if last is not None and _parse_record(last) is None:
            log.warning("%s: removing the truncated last line %r", path, last[:200])
            file.truncate(last_start)
        size = file.seek(0, os.SEEK_END)
        if size:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                file.write(b"\n")
        file.flush()
        os.fsync(file.fileno())


def append_record(path: pathlib.Path, record: dict) -> None:
    """Append one JSON line and force it to disk before the answer counts (a kill afterwards loses nothing)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())
