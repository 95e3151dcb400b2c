"""Human preference labels from a browser, served by the training process itself.

The training loop submits pairs of fragments as RGB clips; a person opens the page, watches the two clips side by
side and answers with the arrow keys; the training loop collects the answers with `LabelServer.take_labels`. Every
answer is appended (flushed and fsynced) to a JSONL log in the run directory (label_log.py), so a killed run loses
nothing and a resumed run reloads what was already labelled.

- server.py: LabelServer, the Flask app and its JSON API.
- label_log.py: the log's format, loading and repair.
- render.py: MinAtar boards and Atari frames as RGB clips, clips as PNG strips (Pillow).
- static/: the page itself (page.html, page.js, page.css), shipped as package data; it loads nothing from
  elsewhere, so it works offline.

Why Flask (on werkzeug's `make_server`): it is a small, synchronous WSGI library, so the server is one daemon thread
inside the training process, talking to the trainer through a lock; it needs no extra service, database or storage
bucket, no event loop and no network access; and werkzeug's router, request parsing and error handling replace
hand-rolled HTTP code.
"""

from agents.feedback.labelling.label_log import Label, load_label_log
from agents.feedback.labelling.render import MINATAR_PALETTE, encode_png, render_gray, render_minatar
from agents.feedback.labelling.server import (
    CHOICES,
    REFUSED_AFTER_TAKE,
    LabelServer,
    shown_left_for,
    stored_label,
)

__all__ = [
    "CHOICES",
    "MINATAR_PALETTE",
    "REFUSED_AFTER_TAKE",
    "Label",
    "LabelServer",
    "encode_png",
    "load_label_log",
    "render_gray",
    "render_minatar",
    "shown_left_for",
    "stored_label",
]
