"""Human preference labels from a browser, served by the training process itself.

The training loop submits pairs of fragments as RGB clips; a person opens the page, watches the two clips side by
side and answers with the arrow keys; the training loop collects the answers with `take_labels`. Every answer is
appended (flushed and fsynced) to a JSONL log in the run directory, so a killed run loses nothing and a resumed run
reloads what was already labelled.

Why Flask (on werkzeug's `make_server`): it is a small, synchronous WSGI library, so the server is one daemon thread
inside the training process, talking to the trainer through a lock; it needs no extra service, database or storage
bucket, no event loop and no network access (the page and its clips are served from memory, so it works offline);
and werkzeug's router, request parsing and error handling replace hand-rolled HTTP code.

Log lines (one per answer, never rewritten):
    {"pair_id": 7, "label": 1.0, "annotator": "alice", "time": 1712345678.9, "shown_left": 2}
    {"pair_id": 7, "undo": true, "annotator": "alice", "time": 1712345680.1}
`label` is always P(fragment 1 preferred): 1.0, 0.0, 0.5 (equally good) or null ("can't tell": the pair is dropped).
`shown_left` is the fragment (1 or 2) the page showed on the left; the left/right swap is undone before saving.

Endpoints: GET / (the page), GET /api/next, GET /api/pairs/<id>/clip/<1|2>.png, POST /api/label, POST /api/undo.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pathlib
import random
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

log = logging.getLogger(__name__)

# The page's answers; stored_label turns them into P(fragment 1 preferred).
CHOICES = ("left", "right", "equal", "skip")
MAX_ANNOTATOR_LENGTH = 100
REFUSED_AFTER_TAKE = "already used for training"


@dataclass
class Label:
    pair_id: int
    label: float | None  # P(fragment 1 preferred): 1.0, 0.0, 0.5 (equally good); None = "can't tell" (pair dropped)
    annotator: str
    time: float  # unix time
    shown_left: int  # 1 or 2: which fragment the page showed on the left


# ---------------------------------------------------------------------------------------------------------------
# Rendering observations as RGB clips

# Distinct colours on black, one per MinAtar channel (Seaquest, the largest game, has 10 channels).
MINATAR_PALETTE = np.array(
    [
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (255, 225, 25),  # yellow
        (0, 130, 200),  # blue
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 240, 240),  # cyan
        (240, 50, 230),  # magenta
        (210, 245, 60),  # lime
        (250, 190, 212),  # pink
        (0, 128, 128),  # teal
        (255, 255, 255),  # white
    ],
    dtype=np.uint8,
)


def _upscale(images: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (T, H, W, ...) by an integer factor: each pixel becomes a scale x scale block."""
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return images.repeat(scale, axis=1).repeat(scale, axis=2)


def render_minatar(boards: np.ndarray, scale: int = 24) -> np.ndarray:
    """(T, C, 10, 10) MinAtar boards (uint8 in {0, 255} or bool, channel-first as the env gives) ->
    (T, 10 * scale, 10 * scale, 3) uint8 RGB: black background, channel c drawn in MINATAR_PALETTE[c], later channels
    on top of earlier ones."""
    boards = np.asarray(boards)
    if boards.ndim != 4:
        raise ValueError(f"MinAtar boards must be (T, C, H, W), got shape {boards.shape}")
    steps, channels, height, width = boards.shape
    if channels > len(MINATAR_PALETTE):
        raise ValueError(f"at most {len(MINATAR_PALETTE)} channels can be coloured, got {channels}")
    rgb = np.zeros((steps, height, width, 3), dtype=np.uint8)
    for channel in range(channels):
        rgb[boards[:, channel] > 0] = MINATAR_PALETTE[channel]
    return _upscale(rgb, scale)


def render_gray(frames: np.ndarray, scale: int = 4) -> np.ndarray:
    """(T, H, W) uint8 grayscale frames (Atari's 84x84) -> (T, H * scale, W * scale, 3) uint8 RGB, nearest-neighbour."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"grayscale frames must be uint8 (T, H, W), got {frames.dtype} {frames.shape}")
    return np.repeat(_upscale(frames, scale)[..., None], 3, axis=-1)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes. A minimal encoder (8-bit truecolour, no row filters, zlib) is all the page
    needs: clips are mostly flat colour, which zlib compresses well, and it costs no image library."""
    height, width, _ = image.shape
    rows = np.ascontiguousarray(image, dtype=np.uint8).reshape(height, width * 3)
    # Each scanline starts with its filter type; 0 = None.
    scanlines = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rows], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _check_clip(name: str, clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or 0 in clip.shape:
        raise ValueError(f"{name} must be a non-empty uint8 RGB video (T, H, W, 3), got {clip.dtype} {clip.shape}")
    return clip


# ---------------------------------------------------------------------------------------------------------------
# The label log


def _is_pair_id(value) -> bool:
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
    if not isinstance(record, dict) or not _is_pair_id(record.get("pair_id")):
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


def _repair_log_tail(path: pathlib.Path) -> None:
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


def _append_line(path: pathlib.Path, record: dict) -> None:
    """Append one JSON line and force it to disk before the answer counts (a kill afterwards loses nothing)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


# ---------------------------------------------------------------------------------------------------------------
# The server


def shown_left_for(pair_id: int) -> int:
    """Which fragment (1 or 2) the page shows on the left: random per pair, so a person cannot learn a side bias,
    but seeded from the pair id so a resumed run shows the pair the same way."""
    return random.Random(f"labelling-pair-{pair_id}").choice((1, 2))


def stored_label(choice: str, shown_left: int) -> float | None:
    """A page answer ("left", "right", "equal", "skip") -> P(fragment 1 preferred), undoing the left/right swap."""
    if choice == "equal":
        return 0.5
    if choice == "skip":
        return None
    preferred_fragment = shown_left if choice == "left" else 3 - shown_left
    return 1.0 if preferred_fragment == 1 else 0.0


@dataclass
class _Pair:
    pair_id: int
    pngs: dict[int, bytes]  # fragment (1 or 2) -> PNG strip of its frames, stacked top to bottom
    frames: int
    height: int
    width: int
    shown_left: int


class _ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _QuietHandler(WSGIRequestHandler):
    """werkzeug logs every request to stderr; the page polls, which would flood the training log."""

    def log_request(self, code="-", size="-"):
        pass


class LabelServer:
    """Queues preference pairs for a person to label in a browser, and hands the answers to the training loop.

    The training thread calls submit / pending / take_labels / wait_until_labelled; HTTP handlers run in werkzeug's
    threads. All shared state is guarded by one lock (a condition, so waiting for labels wakes on each answer).
    """

    def __init__(self, log_path: pathlib.Path, port: int = 0, host: str = "127.0.0.1", fps: int = 12):
        if not isinstance(fps, int) or not 1 <= fps <= 60:
            raise ValueError(f"fps must be an integer in [1, 60], got {fps!r}")
        self.log_path = pathlib.Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.host, self.port, self.fps = host, port, fps
        self._lock = threading.Condition()
        # Every pair with an answer: from the log (final already) and from this process.
        self._answers: dict[int, Label] = load_label_log(self.log_path)
        _repair_log_tail(self.log_path)
        self._taken: set[int] = set(self._answers)  # answers the trainer has (or had, in an earlier run): final
        self._queue: deque[int] = deque()  # pairs waiting, oldest (shown next) first
        self._pairs: dict[int, _Pair] = {}  # clips of queued pairs and of answered pairs not yet taken (undo)
        self._new: list[Label] = []  # answers since the last take_labels, in order
        self._undo_stacks: dict[str, list[int]] = {}  # annotator -> the pairs they answered in this process
        self.app = self._make_app()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- the training side -------------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve in a daemon thread (the trainer never waits for it on exit); return the page's URL."""
        if self._server is not None:
            raise RuntimeError("the label server is already running")
        self._server = make_server(self.host, self.port, self.app, threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        # A short poll interval only makes stop() quick: serve_forever checks for shutdown between polls.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="label-server", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # returns once serve_forever has stopped
        self._thread.join()
        self._server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> LabelServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, pair_id: int, clip1: np.ndarray, clip2: np.ndarray) -> None:
        """Queue one pair: clip1 / clip2 are uint8 RGB videos (T, H, W, 3) of fragments 1 and 2, of equal shapes.
        A pair that already has an answer (in the log or from this process) is not queued again."""
        if not _is_pair_id(pair_id):
            raise TypeError(f"pair_id must be an int, got {pair_id!r}")
        clip1, clip2 = _check_clip("clip1", clip1), _check_clip("clip2", clip2)
        if clip1.shape != clip2.shape:
            raise ValueError(f"the clips of a pair must have equal shapes, got {clip1.shape} and {clip2.shape}")
        with self._lock:
            if pair_id in self._answers:
                return
            if pair_id in self._pairs:
                raise ValueError(f"pair {pair_id} is already queued")
        # PNG strips are encoded once, outside the lock, and are far smaller than the raw frames they replace.
        frames, height, width, _ = clip1.shape
        strips = {1: clip1.reshape(frames * height, width, 3), 2: clip2.reshape(frames * height, width, 3)}
        pngs = {fragment: encode_png(strip) for fragment, strip in strips.items()}
        pair = _Pair(pair_id, pngs, frames, height, width, shown_left_for(pair_id))
        with self._lock:
            if pair_id in self._answers or pair_id in self._pairs:  # raced with another submit of the same id
                return
            self._pairs[pair_id] = pair
            self._queue.append(pair_id)
            self._lock.notify_all()

    def pending(self) -> int:
        """Pairs queued and not yet labelled or dropped."""
        with self._lock:
            return len(self._queue)

    def take_labels(self) -> list[Label]:
        """The answers (labels and drops) that arrived since the last call, in order. They become final: an undo
        is refused from now on."""
        with self._lock:
            taken, self._new = self._new, []
            for label in taken:
                self._taken.add(label.pair_id)
                self._pairs.pop(label.pair_id, None)  # an answer that cannot be undone needs no clips
            return taken

    def wait_until_labelled(
        self, pair_ids: Iterable[int], poll: float = 0.2, stop: threading.Event | None = None
    ) -> None:
        """Block until every pair in `pair_ids` has an answer (a label or a drop), or until `stop` is set.

        Untaken answers can still be undone: a caller that needs all of them calls take_labels after this and
        waits again for any pair missing from what it got.
        """
        pair_ids = list(pair_ids)
        with self._lock:
            unknown = [p for p in pair_ids if p not in self._answers and p not in self._pairs]
            if unknown:
                raise ValueError(f"pairs {unknown[:10]} were never submitted, so they cannot be labelled")
            while not all(p in self._answers for p in pair_ids):
                if stop is not None and stop.is_set():
                    return
                self._lock.wait(timeout=poll)

    # --- answers from the page ---------------------------------------------------------------------------------

    def _next_pair(self) -> dict:
        with self._lock:
            pending = len(self._queue)
            if not pending:
                return {"pair": None, "pending": 0, "fps": self.fps}
            pair = self._pairs[self._queue[0]]
        left, right = pair.shown_left, 3 - pair.shown_left
        clip_url = f"/api/pairs/{pair.pair_id}/clip/{{}}.png"
        return {
            "pair": {
                "pair_id": pair.pair_id,
                "shown_left": left,
                "left_url": clip_url.format(left),
                "right_url": clip_url.format(right),
                "frames": pair.frames,
                "height": pair.height,
                "width": pair.width,
            },
            "pending": pending,
            "fps": self.fps,
        }

    def _clip_png(self, pair_id: int, fragment: int) -> bytes:
        with self._lock:
            pair = self._pairs.get(pair_id)
        if pair is None or fragment not in pair.pngs:
            raise _ApiError(404, f"no clip {fragment} for pair {pair_id}")
        return pair.pngs[fragment]

    def _answer(self, pair_id: int, choice: str, annotator: str) -> Label:
        with self._lock:
            if pair_id in self._answers:
                raise _ApiError(409, f"pair {pair_id} is already labelled")
            if pair_id not in self._queue:
                raise _ApiError(404, f"pair {pair_id} is not waiting for a label")
            shown_left = self._pairs[pair_id].shown_left
            label = Label(pair_id, stored_label(choice, shown_left), annotator, time.time(), shown_left)
            _append_line(self.log_path, asdict(label))  # on disk before it counts
            self._queue.remove(pair_id)
            self._answers[pair_id] = label
            self._new.append(label)
            self._undo_stacks.setdefault(annotator, []).append(pair_id)
            self._lock.notify_all()
            return label

    def _undo(self, annotator: str) -> int:
        """Withdraw the annotator's last answer and put its pair back at the front of the queue."""
        with self._lock:
            stack = self._undo_stacks.get(annotator)
            if not stack:
                raise _ApiError(409, f"{annotator} has no answer to undo")
            pair_id = stack[-1]
            if pair_id in self._taken:
                raise _ApiError(409, REFUSED_AFTER_TAKE)
            _append_line(self.log_path, {"pair_id": pair_id, "undo": True, "annotator": annotator, "time": time.time()})
            stack.pop()
            del self._answers[pair_id]
            self._new = [label for label in self._new if label.pair_id != pair_id]
            self._queue.appendleft(pair_id)
            self._lock.notify_all()
            return pair_id

    # --- the Flask app -----------------------------------------------------------------------------------------

    def _make_app(self) -> Flask:
        app = Flask(__name__)

        @app.get("/")
        def page():
            return Response(PAGE_HTML, mimetype="text/html", headers={"Cache-Control": "no-store"})

        @app.get("/api/next")
        def next_pair():
            return jsonify(self._next_pair())

        @app.get("/api/pairs/<int(signed=True):pair_id>/clip/<int:fragment>.png")
        def clip(pair_id: int, fragment: int):
            png = self._clip_png(pair_id, fragment)
            return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})

        @app.post("/api/label")
        def label():
            body = _json_body()
            pair_id, choice = body.get("pair_id"), body.get("choice")
            if not _is_pair_id(pair_id):
                raise _ApiError(400, "pair_id must be an integer")
            if choice not in CHOICES:
                raise _ApiError(400, f"choice must be one of {', '.join(CHOICES)}")
            answer = self._answer(pair_id, choice, _annotator(body))
            return jsonify({"saved": asdict(answer), "pending": self.pending()})

        @app.post("/api/undo")
        def undo():
            pair_id = self._undo(_annotator(_json_body()))
            return jsonify({"undone": pair_id, "pending": self.pending()})

        # Every error is JSON (the page shows its message); never werkzeug's HTML pages or a traceback.
        @app.errorhandler(_ApiError)
        def api_error(error: _ApiError):
            return jsonify({"error": error.message}), error.status

        @app.errorhandler(HTTPException)
        def http_error(error: HTTPException):
            return jsonify({"error": error.description}), error.code

        @app.errorhandler(Exception)
        def internal_error(error: Exception):
            log.exception("label server: request failed")
            return jsonify({"error": f"internal error: {type(error).__name__}"}), 500

        return app


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


def _annotator(body: dict) -> str:
    annotator = body.get("annotator", "anonymous")
    if not isinstance(annotator, str) or not annotator.strip() or len(annotator) > MAX_ANNOTATOR_LENGTH:
        raise _ApiError(400, f"annotator must be a non-empty string of at most {MAX_ANNOTATOR_LENGTH} characters")
    return annotator.strip()


# ---------------------------------------------------------------------------------------------------------------
# The page: one HTML document, inline CSS and JS, no external assets (the machine may be offline).

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Label preferences</title>
<style>
  body { margin: 0; padding: 16px 24px; background: #1e1f24; color: #e8e8e8; font: 15px/1.4 system-ui, sans-serif; }
  header { display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
  h1 { font-size: 20px; margin: 0; }
  #counter { font-weight: 600; color: #ffd866; }
  #annotator { color: #9ecbff; }
  #pair-name { color: #888; }
  #clips { display: flex; gap: 32px; margin: 18px 0; min-height: 280px; align-items: flex-start; }
  figure { margin: 0; text-align: center; }
  figcaption { margin-top: 6px; color: #bbb; }
  canvas { background: #000; border: 3px solid #444; image-rendering: pixelated; display: block; }
  #buttons { display: flex; gap: 10px; flex-wrap: wrap; }
  button { font: inherit; padding: 8px 14px; border-radius: 6px; border: 1px solid #666; background: #33353d;
           color: #eee; cursor: pointer; }
  button:hover:not(:disabled) { background: #454852; }
  button:disabled { opacity: 0.45; cursor: default; }
  kbd { border: 1px solid #777; border-radius: 3px; padding: 0 4px; font-size: 13px; }
  #message { margin-top: 14px; min-height: 1.4em; color: #a9dc76; }
  #message.error { color: #ff6188; }
  #waiting { color: #aaa; font-size: 18px; }
</style>
</head>
<body data-state="loading" data-pair-id="">
<header>
  <h1>Which clip shows the better behaviour?</h1>
  <span id="counter">&nbsp;</span>
  <span>annotator: <span id="annotator"></span></span>
  <span id="pair-name"></span>
</header>
<div id="clips">
  <figure><canvas id="left" width="240" height="240"></canvas><figcaption>Left <kbd>&larr;</kbd></figcaption></figure>
  <figure><canvas id="right" width="240" height="240"></canvas><figcaption>Right <kbd>&rarr;</kbd></figcaption></figure>
  <div id="waiting" hidden>No pairs waiting: this page checks again every second.</div>
</div>
<div id="buttons">
  <button id="btn-left" data-choice="left"><kbd>&larr;</kbd> Left is better</button>
  <button id="btn-equal" data-choice="equal"><kbd>&uarr;</kbd> Equally good</button>
  <button id="btn-skip" data-choice="skip"><kbd>&darr;</kbd> Can't tell</button>
  <button id="btn-right" data-choice="right"><kbd>&rarr;</kbd> Right is better</button>
  <button id="btn-undo"><kbd>u</kbd> Undo my last answer</button>
</div>
<div id="message"></div>
<script>
"use strict";
const annotator = (new URLSearchParams(location.search).get("annotator") || "anonymous").trim() || "anonymous";
const MIN_SIDE = 240;  // small clips are scaled up on screen so a person can judge them
const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowUp: "equal", ArrowDown: "skip"};
const CHOICE_TEXT = {left: "left preferred", right: "right preferred", equal: "equally good", skip: "dropped"};
let current = null;   // the pair on screen: its JSON from /api/next
let images = null;    // [left strip, right strip]
let frame = 0, timer = null, busy = false, pollTimer = null;

document.getElementById("annotator").textContent = annotator;
document.title = "Label preferences (" + annotator + ")";

function setState(state) {
  document.body.dataset.state = state;
  document.body.dataset.pairId = current ? String(current.pair_id) : "";
  document.getElementById("pair-name").textContent = current ? "pair " + current.pair_id : "";
  const ready = state === "showing";
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = !ready;
  document.getElementById("btn-undo").disabled = busy;
}

function say(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

function showCounter(pending) {
  document.getElementById("counter").textContent = pending + (pending === 1 ? " pair" : " pairs") + " waiting";
}

async function api(method, url, body) {
  const options = {method, headers: {"Content-Type": "application/json"}};
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({error: "bad response (" + response.status + ")"}));
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not load " + url));
    img.src = url;
  });
}

function stopPlaying() { if (timer !== null) { clearInterval(timer); timer = null; } }

// One timer draws frame i of both clips, so the two play in sync; they loop.
function drawFrame() {
  const p = current;
  for (const [i, id] of [[0, "left"], [1, "right"]]) {
    const ctx = document.getElementById(id).getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(images[i], 0, frame * p.height, p.width, p.height, 0, 0, p.width, p.height);
  }
  frame = (frame + 1) % p.frames;
}

function showPair(p, imgs, fps) {
  current = p; images = imgs; frame = 0;
  const zoom = Math.max(1, MIN_SIDE / Math.min(p.width, p.height));
  for (const id of ["left", "right"]) {
    const c = document.getElementById(id);
    c.width = p.width; c.height = p.height;
    c.style.width = Math.round(p.width * zoom) + "px";
    c.style.height = Math.round(p.height * zoom) + "px";
    c.hidden = false;
  }
  document.getElementById("waiting").hidden = true;
  drawFrame();
  timer = setInterval(drawFrame, 1000 / fps);
  setState("showing");
}

function showWaiting() {
  current = null;
  for (const id of ["left", "right"]) document.getElementById(id).hidden = true;
  document.getElementById("waiting").hidden = false;
  setState("waiting");
  pollTimer = setTimeout(loadNext, 1000);
}

async function loadNext() {
  stopPlaying();
  clearTimeout(pollTimer);
  setState("loading");
  try {
    const next = await api("GET", "/api/next");
    showCounter(next.pending);
    if (!next.pair) { showWaiting(); return; }
    const imgs = await Promise.all([loadImage(next.pair.left_url), loadImage(next.pair.right_url)]);
    showPair(next.pair, imgs, next.fps);
  } catch (e) {
    say(e.message, true);
    current = null;
    setState("error");
    pollTimer = setTimeout(loadNext, 2000);
  }
}

async function answer(choice) {
  if (busy || !current || document.body.dataset.state !== "showing") return;
  busy = true;
  const id = current.pair_id;
  setState("saving");
  try {
    await api("POST", "/api/label", {pair_id: id, choice, annotator});
    say("Saved pair " + id + ": " + CHOICE_TEXT[choice] + ".", false);
  } catch (e) {
    say(e.message, true);
  }
  busy = false;
  await loadNext();
}

async function undo() {
  if (busy) return;
  busy = true;
  setState(document.body.dataset.state);
  try {
    const r = await api("POST", "/api/undo", {annotator});
    say("Undone: pair " + r.undone + " is back, answer it again.", false);
    busy = false;
    await loadNext();
  } catch (e) {
    say("Cannot undo: " + e.message, true);
    busy = false;
    setState(document.body.dataset.state);
  }
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (KEYS[event.key]) { event.preventDefault(); answer(KEYS[event.key]); }
  else if (event.key === "u" || event.key === "U") { event.preventDefault(); undo(); }
});
for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => answer(b.dataset.choice));
}
document.getElementById("btn-undo").addEventListener("click", undo);
// Keep the counter fresh while a pair is on screen (the trainer keeps submitting).
setInterval(async () => {
  if (document.body.dataset.state !== "showing") return;
  try { showCounter((await api("GET", "/api/next")).pending); } catch (e) {}
}, 2000);
loadNext();
</script>
</body>
</html>
"""
