"""The label server: a Flask app, run by werkzeug in a daemon thread of the training process.

The training thread calls submit / pending / take_labels / wait_until_labelled; HTTP handlers run in werkzeug's
threads; one lock guards what they share.

Endpoints: GET / (the page: static/page.html, page.js, page.css), GET /api/game, GET /api/next,
GET /api/pairs/<id>/clip/<1|2>.png, POST /api/label, POST /api/undo, POST /api/release.

Several pages (tabs, annotators) can label at once: each page sends a random id of its own, and the server lends each
one a different pending pair (a lease it renews with every poll), so no answer is thrown away because another page
answered the same pair first. A page that closes or reloads gives its pair back (POST /api/release); one that
vanishes without a word loses it after LEASE_SECONDS.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from agents.feedback.labelling.games import game_guide
from agents.feedback.labelling.label_log import (
    Label,
    append_record,
    is_pair_id,
    load_label_log,
    repair_log_tail,
)
from agents.feedback.labelling.render import check_clip, encode_png

# The page's three files, shipped as package data (pyproject.toml) and served as they are.
STATIC = pathlib.Path(__file__).resolve().parent / "static"
PAGE_FILES = ("page.html", "page.js", "page.css")

log = logging.getLogger(__name__)

# The page's answers; stored_label turns them into P(fragment 1 preferred).
CHOICES = ("left", "right", "equal", "skip")
MAX_ANNOTATOR_LENGTH = 100
MAX_PAGE_ID_LENGTH = 100
# A label or an undo is about a hundred bytes: a body far larger is not from the page, and is refused (413) unread.
MAX_REQUEST_BYTES = 16 * 1024
# A page renews the lease on its pair every 2 s while it shows it; a closed tab's pair goes to another page after this.
LEASE_SECONDS = 20.0
REFUSED_AFTER_TAKE = "already used for training"


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


def pick_pair(queue: Sequence[int], leases: Mapping[str, int], page: str | None, showing: int | None) -> int | None:
    """The pending pair `page` should show, given `leases` (page -> the pair it holds, live leases of pending pairs
    only): the pair it holds; else the one it is `showing`, unless another page holds it; else the oldest pair no
    other page holds (None: every pending pair is on another page). A page without an id (a script) holds nothing
    and gets the oldest pair no page holds."""
    if page is not None and page in leases:
        return leases[page]
    held_elsewhere = {pair_id for other, pair_id in leases.items() if other != page}
    if showing is not None and showing in queue and showing not in held_elsewhere:
        return showing
    return next((pair_id for pair_id in queue if pair_id not in held_elsewhere), None)


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

    def __init__(self, log_path: pathlib.Path, port: int = 0, host: str = "127.0.0.1", fps: int = 12, env_id: str = ""):
        if not isinstance(fps, int) or not 1 <= fps <= 60:
            raise ValueError(f"fps must be an integer in [1, 60], got {fps!r}")
        self.log_path = pathlib.Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.host, self.port, self.fps = host, port, fps
        self.guide = game_guide(env_id)  # the game's goal and colours, for the page
        self._lock = threading.Condition()
        # Every pair with an answer: from the log (final already) and from this process.
        self._answers: dict[int, Label] = load_label_log(self.log_path)
        repair_log_tail(self.log_path)
        self._taken: set[int] = set(self._answers)  # answers the trainer has (or had, in an earlier run): final
        self._queue: deque[int] = deque()  # pairs waiting, oldest (shown next) first
        self._pairs: dict[int, _Pair] = {}  # clips of queued pairs and of answered pairs not yet taken (undo)
        self._new: list[Label] = []  # answers since the last take_labels, in order
        self._undo_stacks: dict[str, list[int]] = {}  # annotator -> the pairs they answered in this process
        self._answered_by = Counter(label.annotator for label in self._answers.values())  # final answers per person
        self._leases: dict[str, tuple[int, float]] = {}  # page id -> (the pair it shows, when the lease ends)
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
        if not is_pair_id(pair_id):
            raise TypeError(f"pair_id must be an int, got {pair_id!r}")
        clip1, clip2 = check_clip("clip1", clip1), check_clip("clip2", clip2)
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

    def _live_leases(self) -> dict[str, int]:
        """page -> pair, dropping leases that ran out or whose pair is no longer pending (call with the lock)."""
        now = time.monotonic()
        pending = set(self._queue)
        self._leases = {
            page: (pair_id, ends) for page, (pair_id, ends) in self._leases.items() if ends > now and pair_id in pending
        }
        return {page: pair_id for page, (pair_id, _) in self._leases.items()}

    def _lease(self, page: str, pair_id: int) -> None:
        self._leases[page] = (pair_id, time.monotonic() + LEASE_SECONDS)

    def _release(self, page: str) -> None:
        with self._lock:
            self._leases.pop(page, None)

    def _next_pair(self, page: str | None = None, annotator: str | None = None, showing: int | None = None) -> dict:
        """The pair `page` should show (leased to it), with the counts the page displays."""
        with self._lock:
            leases = self._live_leases()
            pair_id = pick_pair(self._queue, leases, page, showing)
            if page is not None:
                if pair_id is None:
                    self._leases.pop(page, None)
                else:
                    self._lease(page, pair_id)
            counts = {
                "pending": len(self._queue),
                "elsewhere": len({held for other, held in leases.items() if other != page}),  # on other pages
                "answered": self._answered_by[annotator] if annotator is not None else None,
                "fps": self.fps,
            }
            pair = None if pair_id is None else self._pairs[pair_id]
        if pair is None:
            return {"pair": None, **counts}
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
            **counts,
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
            append_record(self.log_path, asdict(label))  # on disk before it counts
            self._queue.remove(pair_id)
            self._answers[pair_id] = label
            self._new.append(label)
            self._undo_stacks.setdefault(annotator, []).append(pair_id)
            self._answered_by[annotator] += 1
            self._leases = {page: lease for page, lease in self._leases.items() if lease[0] != pair_id}
            self._lock.notify_all()
            return label

    def _undo(self, annotator: str, page: str | None = None) -> int:
        """Withdraw the annotator's last answer and put its pair back at the front of the queue, leased to `page`
        (the page that asked shows it next)."""
        with self._lock:
            stack = self._undo_stacks.get(annotator)
            if not stack:
                raise _ApiError(409, f"{annotator} has no answer to undo")
            pair_id = stack[-1]
            if pair_id in self._taken:
                raise _ApiError(409, REFUSED_AFTER_TAKE)
            append_record(
                self.log_path, {"pair_id": pair_id, "undo": True, "annotator": annotator, "time": time.time()}
            )
            stack.pop()
            del self._answers[pair_id]
            self._new = [label for label in self._new if label.pair_id != pair_id]
            self._queue.appendleft(pair_id)
            self._answered_by[annotator] -= 1
            if page is not None:
                self._lease(page, pair_id)
            self._lock.notify_all()
            return pair_id

    # --- the Flask app -----------------------------------------------------------------------------------------

    def _make_app(self) -> Flask:
        app = Flask(__name__, static_folder=None)  # serves PAGE_FILES only
        app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES  # a body read past this is refused (413)

        @app.before_request
        def refuse_large_bodies():
            # Every request, whether or not its handler reads the body: one over the limit is refused unread.
            if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
                raise RequestEntityTooLarge()

        @app.get("/")
        def page():
            return _static_file("page.html")

        @app.get("/<any(page.js, page.css):name>")
        def page_asset(name: str):
            return _static_file(name)

        @app.get("/api/game")
        def game():
            return jsonify(self.guide)

        @app.get("/api/next")
        def next_pair():
            query = request.args
            annotator = _annotator(query) if "annotator" in query else None
            showing = query.get("showing", type=int)
            return jsonify(self._next_pair(_page_id(query), annotator, showing))

        @app.get("/api/pairs/<int(signed=True):pair_id>/clip/<int:fragment>.png")
        def clip(pair_id: int, fragment: int):
            png = self._clip_png(pair_id, fragment)
            return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})

        @app.post("/api/label")
        def label():
            body = _json_body()
            pair_id, choice = body.get("pair_id"), body.get("choice")
            if not is_pair_id(pair_id):
                raise _ApiError(400, "pair_id must be an integer")
            if choice not in CHOICES:
                raise _ApiError(400, f"choice must be one of {', '.join(CHOICES)}")
            _page_id(body)  # checked, though an answer counts whichever page it comes from
            answer = self._answer(pair_id, choice, _annotator(body))
            return jsonify({"saved": asdict(answer), "pending": self.pending()})

        @app.post("/api/undo")
        def undo():
            body = _json_body()
            pair_id = self._undo(_annotator(body), _page_id(body))
            return jsonify({"undone": pair_id, "pending": self.pending()})

        @app.post("/api/release")
        def release():
            # Sent by a closing page (navigator.sendBeacon, whose body is JSON text of any content type).
            page = _page_id(_json_body(force=True))
            if page is not None:
                self._release(page)
            return jsonify({"released": page})

        # Every error is JSON (the page shows its message); never werkzeug's HTML pages or a traceback.
        @app.errorhandler(_ApiError)
        def api_error(error: _ApiError):
            return jsonify({"error": error.message}), error.status

        @app.errorhandler(RequestEntityTooLarge)
        def too_large(error: RequestEntityTooLarge):
            return jsonify({"error": f"the request body is larger than {MAX_REQUEST_BYTES} bytes"}), 413

        @app.errorhandler(HTTPException)
        def http_error(error: HTTPException):
            return jsonify({"error": error.description}), error.code

        @app.errorhandler(Exception)
        def internal_error(error: Exception):
            log.exception("label server: request failed")
            return jsonify({"error": f"internal error: {type(error).__name__}"}), 500

        return app


def _json_body(force: bool = False) -> dict:
    body = request.get_json(silent=True, force=force)
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


def _page_id(fields: Mapping) -> str | None:
    """The id a page sends with its requests (random per page), or None for a client that sends none."""
    page = fields.get("page")
    if page is None:
        return None
    if not isinstance(page, str) or not page or len(page) > MAX_PAGE_ID_LENGTH:
        raise _ApiError(400, f"page must be a non-empty string of at most {MAX_PAGE_ID_LENGTH} characters")
    return page


def _annotator(body: Mapping) -> str:
    annotator = body.get("annotator", "anonymous")
    if not isinstance(annotator, str) or not annotator.strip() or len(annotator) > MAX_ANNOTATOR_LENGTH:
        raise _ApiError(400, f"annotator must be a non-empty string of at most {MAX_ANNOTATOR_LENGTH} characters")
    return annotator.strip()


def _static_file(name: str) -> Response:
    # no-store: a page left open across a code update must not run yesterday's script against today's API.
    response = send_from_directory(STATIC, name, max_age=0)
    response.headers["Cache-Control"] = "no-store"
    return response
