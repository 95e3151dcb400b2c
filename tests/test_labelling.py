"""The labelling page: HTTP API (Flask's test client, one real-HTTP round trip), label log, rendering, and one
real-browser session (headless Chromium via Selenium)."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import agents.feedback.labelling.server as labelling_server
from agents.feedback.labelling import (
    MINATAR_PALETTE,
    REFUSED_AFTER_TAKE,
    Label,
    LabelServer,
    encode_png,
    load_label_log,
    render_gray,
    render_minatar,
    shown_left_for,
    stored_label,
)
from agents.feedback.labelling.games import ATARI_DEFAULT_GOAL, ATARI_GOALS, MINATAR_GAMES, game_guide
from agents.feedback.labelling.server import MAX_REQUEST_BYTES, PAGE_FILES, pick_pair

REPO = Path(__file__).resolve().parents[1]


def clip(seed: int, frames: int = 3, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def server(tmp_path):
    return LabelServer(tmp_path / "labels.jsonl")


@pytest.fixture
def client(server):
    return server.app.test_client()


def post(client, url: str, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def label(client, pair_id: int, choice: str, annotator: str = "alice"):
    return post(client, "/api/label", {"pair_id": pair_id, "choice": choice, "annotator": annotator})


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_minatar_colours_channels_on_black_later_channels_on_top():
    boards = np.zeros((2, 3, 10, 10), dtype=np.uint8)
    boards[0, 0, 1, 2] = 255
    boards[0, 1, 5, 5] = 255
    boards[0, 0, 7, 7] = boards[0, 2, 7, 7] = 255  # channels 0 and 2 overlap: 2 is drawn on top
    rgb = render_minatar(boards, scale=24)
    assert rgb.shape == (2, 240, 240, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 24:48, 48:72] == MINATAR_PALETTE[0]).all()  # the whole 24x24 block of cell (1, 2)
    assert (rgb[0, 5 * 24 + 3, 5 * 24 + 20] == MINATAR_PALETTE[1]).all()
    assert (rgb[0, 7 * 24, 7 * 24] == MINATAR_PALETTE[2]).all()
    assert (rgb[1] == 0).all()  # an empty board is black
    assert len({tuple(colour) for colour in MINATAR_PALETTE}) == len(MINATAR_PALETTE)
    assert (MINATAR_PALETTE.sum(1) > 150).all()  # every colour stands out on black
    assert render_minatar(boards.astype(bool), scale=2).shape == (2, 20, 20, 3)


def test_render_gray_upscales_nearest_neighbour_to_rgb():
    frames = np.random.default_rng(0).integers(0, 256, (2, 84, 84), dtype=np.uint8)
    rgb = render_gray(frames)
    assert rgb.shape == (2, 336, 336, 3) and rgb.dtype == np.uint8
    assert (rgb[:, ::4, ::4, 1] == frames).all() and (rgb[:, 3::4, 3::4, 0] == frames).all()
    assert (rgb[..., 0] == rgb[..., 2]).all()
    with pytest.raises(ValueError, match="uint8"):
        render_gray(frames.astype(np.float32))


def test_encode_png_round_trips():
    image = clip(0, frames=1, size=7)[0]
    assert (decode_png(encode_png(image)) == image).all()


# ---------------------------------------------------------------------------------------------------------------
# Labelling through the API


def test_left_right_order_is_random_per_pair_and_reproducible():
    sides = [shown_left_for(pair_id) for pair_id in range(40)]
    assert set(sides) == {1, 2} and sides == [shown_left_for(pair_id) for pair_id in range(40)]
    assert stored_label("left", 1) == 1.0 and stored_label("right", 1) == 0.0
    assert stored_label("left", 2) == 0.0 and stored_label("right", 2) == 1.0
    assert stored_label("equal", 2) == 0.5 and stored_label("skip", 1) is None


def test_page_and_its_two_files_come_from_this_server(client):
    """The page loads page.js and page.css from the server that serves it, and nothing from elsewhere (the machine
    may be offline)."""
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert html.count("<canvas") == 2 and "annotator" in html
    assert sorted(re.findall(r'(?:src|href)="([^"]*)"', html)) == ["page.css", "page.js"]
    for name, mimetype in (("page.js", "text/javascript"), ("page.css", "text/css")):
        asset = client.get("/" + name)
        assert asset.status_code == 200 and asset.mimetype == mimetype
        assert asset.headers["Cache-Control"] == "no-store"
        text = asset.get_data(as_text=True)
        assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text
    assert "ArrowLeft" in client.get("/page.js").get_data(as_text=True)
    for path in ("/page.html", "/static/page.js", "/server.py", "/label_log.py"):
        assert client.get(path).status_code == 404, path


def test_the_page_files_are_package_data():
    """A non-editable install (a wheel) ships only the package data pyproject.toml declares: every file of the page
    must match it. Caught: the declaration removed, or a page file the patterns miss."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = declared["agents.feedback.labelling"]
    package = REPO / "agents" / "feedback" / "labelling"
    for name in PAGE_FILES:
        relative = (package / "static" / name).relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert sorted(path.name for path in (package / "static").iterdir()) == sorted(PAGE_FILES)


def test_next_shows_the_oldest_pair_with_its_clips_swapped_as_seeded(server, client):
    assert client.get("/api/next").get_json() == {
        "pair": None,
        "pending": 0,
        "elsewhere": 0,
        "answered": None,
        "fps": 12,
    }
    clips = {pair_id: (clip(2 * pair_id, 5, 6), clip(2 * pair_id + 1, 5, 6)) for pair_id in (1, 0)}  # 5 frames of 6x6
    for pair_id, (clip1, clip2) in clips.items():
        server.submit(pair_id, clip1, clip2)
    next_pair = client.get("/api/next").get_json()
    assert next_pair["pending"] == 2
    shown = next_pair["pair"]
    assert shown["pair_id"] == 1 and shown["shown_left"] == shown_left_for(1) == 2
    assert (shown["frames"], shown["height"], shown["width"]) == (5, 6, 6)
    left, right = (decode_png(client.get(shown[f"{side}_url"]).data) for side in ("left", "right"))
    clip1, clip2 = clips[1]
    assert (left == clip2.reshape(30, 6, 3)).all() and (right == clip1.reshape(30, 6, 3)).all()  # frames stacked
    assert client.get("/api/pairs/1/clip/3.png").status_code == 404
    assert client.get("/api/pairs/99/clip/1.png").get_json() == {"error": "no clip 1 for pair 99"}


def test_labels_undo_the_left_right_swap_and_are_logged(server, client):
    pair_ids = [0, 1, 2, 3, 4, 5]
    for pair_id in pair_ids:
        server.submit(pair_id, clip(pair_id), clip(100 + pair_id))
    assert server.pending() == 6
    choices = ["left", "left", "right", "right", "equal", "skip"]
    for pair_id, choice in zip(pair_ids, choices):
        response = label(client, pair_id, choice)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["saved"]["label"] == stored_label(choice, shown_left_for(pair_id))
    assert server.pending() == 0
    assert [shown_left_for(pair_id) for pair_id in pair_ids[:4]] == [1, 2, 1, 2]
    # Pairs 0 to 3 were shown with fragment 1, 2, 1, 2 on the left: "left" means fragment 1, then 2; "right" means
    # fragment 2, then 1.
    expected = [1.0, 0.0, 0.0, 1.0, 0.5, None]
    labels = server.take_labels()
    assert [(x.pair_id, x.label, x.shown_left, x.annotator) for x in labels] == [
        (pair_id, y, shown_left_for(pair_id), "alice") for pair_id, y in zip(pair_ids, expected)
    ]
    assert server.take_labels() == []
    records = log_records(server.log_path)
    assert [record["label"] for record in records] == expected
    assert set(records[0]) == {"pair_id", "label", "annotator", "time", "shown_left"}
    assert all(abs(record["time"] - time.time()) < 60 for record in records)
    assert load_label_log(server.log_path) == {x.pair_id: x for x in labels}


def test_undo_before_take_requeues_the_pair_at_the_front(server, client):
    for pair_id in range(3):
        server.submit(pair_id, clip(pair_id), clip(10 + pair_id))
    assert label(client, 0, "left").status_code == 200
    assert label(client, 1, "equal", annotator="bob").status_code == 200
    response = post(client, "/api/undo", {"annotator": "alice"})  # alice's last answer is pair 0, not bob's pair 1
    assert response.status_code == 200 and response.get_json() == {"undone": 0, "pending": 2}
    assert client.get("/api/next").get_json()["pair"]["pair_id"] == 0
    assert post(client, "/api/undo", {"annotator": "alice"}).status_code == 409  # nothing left to undo
    assert label(client, 0, "skip").status_code == 200
    assert [(x.pair_id, x.label, x.annotator) for x in server.take_labels()] == [(1, 0.5, "bob"), (0, None, "alice")]
    records = log_records(server.log_path)
    assert [(r["pair_id"], "undo" in r) for r in records] == [(0, False), (1, False), (0, True), (0, False)]
    assert set(records[2]) == {"pair_id", "undo", "annotator", "time"} and records[2]["undo"] is True
    assert {pair_id: x.label for pair_id, x in load_label_log(server.log_path).items()} == {1: 0.5, 0: None}


def test_undo_after_take_is_refused(server, client):
    server.submit(7, clip(0), clip(1))
    label(client, 7, "right")
    assert len(server.take_labels()) == 1
    response = post(client, "/api/undo", {"annotator": "alice"})
    assert response.status_code == 409 and response.get_json() == {"error": REFUSED_AFTER_TAKE}
    assert server.pending() == 0 and len(log_records(server.log_path)) == 1


def test_bad_requests_get_a_json_error(server, client):
    server.submit(1, clip(0), clip(1))
    bad_bodies = [
        {"choice": "left"},
        {"pair_id": "1", "choice": "left"},
        {"pair_id": True, "choice": "left"},
        {"pair_id": 1, "choice": "up"},
        {"pair_id": 1, "choice": "left", "annotator": ""},
        {"pair_id": 1, "choice": "left", "annotator": 3},
        [1, "left"],
    ]
    for body in bad_bodies:
        response = post(client, "/api/label", body)
        assert response.status_code == 400 and "error" in response.get_json(), body
    for raw in ("not json", ""):
        response = client.post("/api/label", data=raw, content_type="application/json")
        assert response.status_code == 400 and "JSON object" in response.get_json()["error"]
    assert client.post("/api/undo", data="{").status_code == 400
    assert label(client, 2, "left").status_code == 404  # never submitted
    assert label(client, 1, "left").status_code == 200
    assert label(client, 1, "right").status_code == 409  # already answered
    for response in (client.get("/nowhere"), client.delete("/api/label")):
        assert response.status_code in (404, 405) and "error" in response.get_json()
        assert "Traceback" not in response.get_data(as_text=True)
    assert len(log_records(server.log_path)) == 1


def test_submit_checks_its_clips(server):
    with pytest.raises(ValueError, match="uint8 RGB"):
        server.submit(0, clip(0).astype(np.float32), clip(1))
    with pytest.raises(ValueError, match="uint8 RGB"):
        server.submit(0, clip(0)[..., 0], clip(1)[..., 0])
    with pytest.raises(ValueError, match="equal shapes"):
        server.submit(0, clip(0), clip(1, frames=4))
    server.submit(0, clip(0), clip(1))
    with pytest.raises(ValueError, match="already queued"):
        server.submit(0, clip(0), clip(1))


# ---------------------------------------------------------------------------------------------------------------
# Several pages at once


def test_pick_pair_gives_each_page_a_pair_no_other_page_holds():
    queue = [4, 5, 6]
    assert pick_pair(queue, {}, "a", None) == 4
    assert pick_pair(queue, {"a": 4}, "a", None) == 4  # a page keeps its pair
    assert pick_pair(queue, {"a": 4}, "b", None) == 5  # ... which no other page gets
    assert pick_pair(queue, {"a": 4, "b": 5}, "c", None) == 6
    assert pick_pair(queue, {"a": 4, "b": 5, "c": 6}, "d", None) is None  # all on other pages: wait
    assert pick_pair(queue, {"a": 4}, "b", 6) == 6  # a page that lost its loan keeps the pair it shows, if free
    assert pick_pair(queue, {"a": 4}, "b", 4) == 5  # ... unless another page holds it
    assert pick_pair(queue, {"a": 4}, None, None) == 5  # a script (no page id) gets a pair no page holds
    assert pick_pair([], {}, "a", None) is None


def next_for(client, page: str, annotator: str = "alice", **extra) -> dict:
    query = {"page": page, "annotator": annotator, **extra}
    return client.get("/api/next", query_string=query).get_json()


def test_two_pages_are_shown_different_pairs_and_each_annotator_sees_their_count(server, client):
    """Caught before: every page was shown the oldest pending pair, so a second annotator's answers to it were
    refused (409) and their time lost."""
    for pair_id in range(4):
        server.submit(pair_id, clip(pair_id), clip(10 + pair_id))
    alice, bob = next_for(client, "tab-a"), next_for(client, "tab-b", "bob")
    assert (alice["pair"]["pair_id"], bob["pair"]["pair_id"]) == (0, 1)
    assert next_for(client, "tab-a")["pair"]["pair_id"] == 0, "a page keeps its pair while it polls"
    assert (alice["elsewhere"], next_for(client, "tab-a")["elsewhere"]) == (0, 1)
    assert (alice["answered"], bob["answered"]) == (0, 0)
    assert (
        post(client, "/api/label", {"pair_id": 1, "choice": "left", "annotator": "bob", "page": "tab-b"}).status_code
        == 200
    )
    assert next_for(client, "tab-b", "bob")["pair"]["pair_id"] == 2, "pair 0 is still alice's"
    assert next_for(client, "tab-b", "bob")["answered"] == 1 and next_for(client, "tab-a")["answered"] == 0
    assert next_for(client, "tab-c", "carol")["pair"]["pair_id"] == 3
    waiting = next_for(client, "tab-d", "dan")
    assert waiting["pair"] is None and (waiting["pending"], waiting["elsewhere"]) == (3, 3)
    # A script without a page id sees a pair no page holds, and holds none itself.
    assert client.get("/api/next").get_json()["pair"] is None
    # Undo: the pair comes back to the page that asked, ahead of the one it showed.
    assert post(client, "/api/undo", {"annotator": "bob", "page": "tab-b"}).get_json()["undone"] == 1
    assert (
        next_for(client, "tab-b", "bob")["pair"]["pair_id"] == 1 and next_for(client, "tab-b", "bob")["answered"] == 0
    )
    assert next_for(client, "tab-d", "dan")["pair"]["pair_id"] == 2, "the pair tab-b gave up"
    for bad in ({"page": ""}, {"page": "x" * 101}, {"page": "a", "annotator": ""}):
        assert client.get("/api/next", query_string=bad).status_code == 400, bad
    assert post(client, "/api/label", {"pair_id": 2, "choice": "left", "page": 3}).status_code == 400


def test_a_closed_page_gives_its_pair_back_when_its_loan_runs_out(server, client, monkeypatch):
    monkeypatch.setattr(labelling_server, "LEASE_SECONDS", 0.2)
    for pair_id in range(2):
        server.submit(pair_id, clip(pair_id), clip(10 + pair_id))
    assert next_for(client, "closed")["pair"]["pair_id"] == 0
    assert next_for(client, "open")["pair"]["pair_id"] == 1
    time.sleep(0.3)
    assert next_for(client, "open", showing=1)["pair"]["pair_id"] == 1, "a page that polls keeps what it shows"
    assert next_for(client, "other")["pair"]["pair_id"] == 0, "the closed page's loan ran out"


def test_a_closing_page_gives_its_pair_back_at_once(server, client):
    for pair_id in range(2):
        server.submit(pair_id, clip(pair_id), clip(10 + pair_id))
    assert next_for(client, "closing")["pair"]["pair_id"] == 0
    # What navigator.sendBeacon sends: JSON text, whatever the content type.
    response = client.post("/api/release", data=json.dumps({"page": "closing"}), content_type="text/plain")
    assert response.status_code == 200 and response.get_json() == {"released": "closing"}
    assert next_for(client, "other")["pair"]["pair_id"] == 0
    assert client.post("/api/release", data="[]").status_code == 400


def test_answers_per_annotator_count_the_log_of_earlier_runs(tmp_path):
    log_path = tmp_path / "labels.jsonl"
    first = LabelServer(log_path)
    for pair_id in range(3):
        first.submit(pair_id, clip(pair_id), clip(5 + pair_id))
    for pair_id, annotator in ((0, "alice"), (1, "alice"), (2, "bob")):
        label(first.app.test_client(), pair_id, "left", annotator)
    resumed = LabelServer(log_path).app.test_client()
    assert next_for(resumed, "p", "alice")["answered"] == 2 and next_for(resumed, "p", "bob")["answered"] == 1


def test_a_request_body_over_the_limit_is_refused_unread(server, client):
    """Caught before: a 50 MB body was read, parsed, and its answer saved."""
    server.submit(1, clip(0), clip(1))
    body = {"pair_id": 1, "choice": "left", "annotator": "alice", "padding": ""}
    body["padding"] = "x" * (MAX_REQUEST_BYTES + 1 - len(json.dumps(body)))
    response = post(client, "/api/label", body)
    assert response.status_code == 413
    assert response.get_json() == {"error": f"the request body is larger than {MAX_REQUEST_BYTES} bytes"}
    assert client.post("/api/undo", data=b"{" * (MAX_REQUEST_BYTES + 1)).status_code == 413
    assert not server.log_path.exists() or not server.log_path.read_text() and server.pending() == 1
    body["padding"] = "x" * 1000  # an ordinary body (an extra field is ignored)
    assert post(client, "/api/label", body).status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# What the page says about the game


def test_game_guide_for_minatar_and_atari(tmp_path):
    breakout = game_guide("MinAtar/Breakout-v1")
    assert breakout["game"] == "MinAtar Breakout" and "ball" in breakout["goal"]
    assert [entry["colour"] for entry in breakout["legend"]] == ["#e6194b", "#3cb44b", "#ffe119", "#0082c8"]
    assert breakout["legend"][0]["name"].startswith("paddle")
    assert game_guide("BeamRiderNoFrameskip-v4")["goal"] == ATARI_GOALS["BeamRider"]
    assert game_guide("ALE/Pong-v5") == {"game": "Pong", "goal": ATARI_GOALS["Pong"], "legend": []}
    assert game_guide("ALE/Zaxxon-v5")["goal"] == ATARI_DEFAULT_GOAL
    assert game_guide("")["goal"] == ATARI_DEFAULT_GOAL
    server = LabelServer(tmp_path / "labels.jsonl", env_id="MinAtar/Seaquest-v1")
    assert server.app.test_client().get("/api/game").get_json() == game_guide("MinAtar/Seaquest-v1")


def test_minatar_legends_name_every_channel_in_order():
    """The legend's colours are the boards' channels: one name per channel of the game, in the game's order."""
    minatar = pytest.importorskip("minatar")
    games = {"Asterix": "asterix", "Breakout": "breakout", "Freeway": "freeway", "Seaquest": "seaquest"}
    games["SpaceInvaders"] = "space_invaders"
    assert set(MINATAR_GAMES) == set(games)
    for game, module in games.items():
        channels = minatar.Environment(module).env.channels
        names = MINATAR_GAMES[game][1]
        assert len(names) == len(channels), game
        for raw, index in channels.items():  # the package's channel name is recognisable in ours
            words = [word for word in raw.replace("guage", "gauge").split("_") if not word.startswith("speed")]
            assert not words or any(word in names[index] for word in words), (game, raw, names[index])


# ---------------------------------------------------------------------------------------------------------------
# The log across runs


def test_resume_reloads_the_log_and_never_requeues_answered_pairs(tmp_path):
    log_path = tmp_path / "labels.jsonl"
    first = LabelServer(log_path)
    for pair_id in range(3):
        first.submit(pair_id, clip(pair_id), clip(5 + pair_id))
    label(first.app.test_client(), 0, "left")
    label(first.app.test_client(), 1, "skip")
    # Killed here: pair 2 unanswered, nothing taken.
    second = LabelServer(log_path)
    for pair_id in range(4):
        second.submit(pair_id, clip(pair_id), clip(5 + pair_id))
    assert second.pending() == 2 and second.app.test_client().get("/api/next").get_json()["pair"]["pair_id"] == 2
    assert post(second.app.test_client(), "/api/undo", {"annotator": "alice"}).status_code == 409
    second.wait_until_labelled([0, 1])  # answered in the earlier run: returns at once
    assert second.take_labels() == []
    assert sorted(load_label_log(log_path)) == [0, 1]


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
    log_path = tmp_path / "labels.jsonl"
    good = {"pair_id": 4, "label": 0.5, "annotator": "a", "time": 1.0, "shown_left": 1}
    log_path.write_text(json.dumps(good) + "\n" + '{"pair_id": 5, "label": 1.0, "ann')
    assert load_label_log(log_path) == {4: Label(4, 0.5, "a", 1.0, 1)}
    server = LabelServer(log_path)
    server.submit(5, clip(0), clip(1))
    label(server.app.test_client(), 5, "equal")
    assert sorted(load_label_log(log_path)) == [4, 5]
    assert [record["pair_id"] for record in log_records(log_path)] == [4, 5]
    # A complete last record that lost only its newline is kept.
    log_path.write_text(json.dumps(good))
    LabelServer(log_path).submit(4, clip(0), clip(1))
    assert log_path.read_text() == json.dumps(good) + "\n"


def test_malformed_lines_before_the_last_raise_naming_file_and_line(tmp_path):
    log_path = tmp_path / "labels.jsonl"
    assert load_label_log(log_path) == {}
    good = json.dumps({"pair_id": 1, "label": 1.0, "annotator": "a", "time": 1.0, "shown_left": 2})
    cases = {
        "garbage": [good, "", "garbage", good.replace('"pair_id": 1', '"pair_id": 2')],
        "label": [good.replace("1.0, ", "0.7, ", 1), good.replace('"pair_id": 1', '"pair_id": 2')],
        "again": [good, good],
        "undo": [json.dumps({"pair_id": 3, "undo": True, "annotator": "a", "time": 1.0}), good],
    }
    for name, lines in cases.items():
        log_path.write_text("\n".join(lines) + "\n")
        line = 3 if name == "garbage" else 2 if name == "again" else 1
        with pytest.raises(ValueError, match=rf"labels\.jsonl, line {line}:"):
            load_label_log(log_path)
        with pytest.raises(ValueError):
            LabelServer(log_path)


# ---------------------------------------------------------------------------------------------------------------
# Waiting, and a real HTTP server


def test_wait_until_labelled_returns_on_answers_or_stop(server, client):
    for pair_id in (1, 2):
        server.submit(pair_id, clip(0), clip(1))
    with pytest.raises(ValueError, match="never submitted"):
        server.wait_until_labelled([1, 3])
    stop = threading.Event()
    stop.set()
    server.wait_until_labelled([1, 2], stop=stop)  # returns although nothing is labelled

    def annotate():
        time.sleep(0.05)
        label(client, 2, "left")
        label(client, 1, "skip")

    annotator = threading.Thread(target=annotate)
    annotator.start()
    started = time.monotonic()
    server.wait_until_labelled([1, 2], poll=5.0)  # the answers wake it, not the poll
    assert time.monotonic() - started < 3.0
    annotator.join()
    assert [x.pair_id for x in server.take_labels()] == [2, 1]


def test_real_http_round_trip(tmp_path):
    with LabelServer(tmp_path / "labels.jsonl", fps=8) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        server.submit(3, clip(0), clip(1))
        with urllib.request.urlopen(server.url + "api/next", timeout=10) as response:
            assert json.load(response)["pair"]["pair_id"] == 3
        request = urllib.request.Request(
            server.url + "api/label",
            data=json.dumps({"pair_id": 3, "choice": "equal", "annotator": "carol"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["pending"] == 0
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(urllib.request.Request(server.url + "api/undo", data=b"[]"), timeout=10)
        assert error.value.code == 400 and "error" in json.load(error.value)
        server.submit(4, clip(0), clip(1))
        huge = json.dumps({"pair_id": 4, "choice": "left", "annotator": "x", "padding": "x" * (50 << 20)}).encode()
        with pytest.raises(urllib.error.HTTPError) as error:  # answered without reading the 50 MB
            urllib.request.urlopen(
                urllib.request.Request(
                    server.url + "api/label", data=huge, headers={"Content-Type": "application/json"}
                ),
                timeout=30,
            )
        assert error.value.code == 413 and "larger than" in json.load(error.value)["error"]
        assert server.pending() == 1
    assert [(x.pair_id, x.label, x.annotator) for x in server.take_labels()] == [(3, 0.5, "carol")]


# ---------------------------------------------------------------------------------------------------------------
# A real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium_driver(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium skips Selenium Manager (no downloads)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,760",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def random_minatar_boards(rng: np.random.Generator, frames: int = 25, channels: int = 4) -> np.ndarray:
    return ((rng.random((frames, channels, 10, 10)) < 0.06) * 255).astype(np.uint8)


needs_chromium = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # should Selenium Manager run at all, it must not go online
    driver = chromium_driver(tmp_path)
    yield driver
    driver.quit()


class Page:
    """One window of the browser, showing the labelling page."""

    def __init__(self, driver, url: str, annotator: str, new_window: bool = False):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        if new_window:
            driver.switch_to.new_window("window")
        self.handle = driver.current_window_handle
        driver.get(url + "?annotator=" + annotator)

    def focus(self) -> Page:
        self.driver.switch_to.window(self.handle)
        return self

    def text(self, element_id: str) -> str:
        return self.focus().driver.find_element(self.by.ID, element_id).text

    def attribute(self, name: str) -> str:
        return self.focus().driver.find_element(self.by.TAG_NAME, "body").get_attribute(name)

    def wait_for_pair(self, pair_id: int, timeout: float = 15) -> None:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def showing(_) -> bool:
            return self.attribute("data-state") == "showing" and self.attribute("data-pair-id") == str(pair_id)

        try:
            WebDriverWait(self.driver, timeout).until(showing)
        except TimeoutException:
            state, shown = self.attribute("data-state"), self.attribute("data-pair-id")
            message = self.text("message")
            raise AssertionError(f"waited for pair {pair_id}; the page is {state} {shown} ({message!r})") from None

    def wait_until(self, condition, timeout: float = 15) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout).until(lambda _: condition())

    def press(self, key: str) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.focus().driver).send_keys(key).perform()

    def script(self, code: str, *args):
        return self.focus().driver.execute_script(code, *args)


@needs_chromium
def test_browser_labels_with_keys_and_undo(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    rng = np.random.default_rng(0)
    server = LabelServer(tmp_path / "labels.jsonl", env_id="MinAtar/Breakout-v1")
    pair_ids = list(range(10, 18))
    for pair_id in pair_ids:
        server.submit(pair_id, render_minatar(random_minatar_boards(rng)), render_minatar(random_minatar_boards(rng)))
    url = server.start()
    try:
        page = Page(driver, url, "tester")
        page.wait_for_pair(10)
        assert page.text("annotator") == "tester" and page.text("answered") == "(0 answered)"
        assert page.text("counter") == "8 pairs waiting"
        # The game's goal and its colours.
        assert page.text("game-name") == "MinAtar Breakout:"
        assert page.text("goal-text") == MINATAR_GAMES["Breakout"][0]
        legend = driver.find_elements(By.CSS_SELECTOR, "#legend li")
        assert [item.text for item in legend] == list(MINATAR_GAMES["Breakout"][1])
        swatch = legend[0].find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color")
        assert swatch == "rgba({}, {}, {}, 1)".format(*MINATAR_PALETTE[0])
        for side in ("left", "right"):
            canvas = driver.find_element(By.ID, side)
            assert canvas.size["width"] >= 240 and canvas.size["height"] >= 240
            lit = driver.execute_script(
                "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                "let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] + d[i + 1] + d[i + 2] > 0; return n;",
                canvas,
            )
            assert lit > 0  # a clip frame was drawn, not a black canvas
        # The clips play: the picture changes (every frame of these random boards differs).
        fingerprint = (
            "const c = document.getElementById('left'); const d = c.getContext('2d').getImageData(0, 0, 240, 240).data;"
            "let h = 0; for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + 7 * d[i + 1]) | 0; return h;"
        )
        first = driver.execute_script(fingerprint)
        WebDriverWait(driver, 5).until(lambda _: driver.execute_script(fingerprint) != first)

        keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_UP, Keys.ARROW_DOWN]
        for pair_id, key in zip(pair_ids, keys):
            page.wait_for_pair(pair_id)
            page.press(key)
        page.wait_for_pair(14)
        page.press("u")  # undo the drop of pair 13: it comes back first
        page.wait_for_pair(13)
        assert "pair 13 is back" in page.text("message")
        page.press(Keys.ARROW_LEFT)
        page.wait_for_pair(14)
        assert page.text("counter") == "4 pairs waiting" and page.text("answered") == "(4 answered)"
        if os.environ.get("SOBIRL_SAVE_SCREENSHOT") == "1":
            time.sleep(0.4)  # let the clips play a few frames
            driver.save_screenshot(str(REPO / "docs" / "labelling_page.png"))
        driver.find_element(By.ID, "btn-right").click()  # the buttons do what the keys do
        page.wait_for_pair(15)

        expected = {
            10: stored_label("left", shown_left_for(10)),
            11: stored_label("right", shown_left_for(11)),
            12: 0.5,
            13: stored_label("left", shown_left_for(13)),
            14: stored_label("right", shown_left_for(14)),
        }
        labels = server.take_labels()
        assert [(x.pair_id, x.label, x.annotator) for x in labels] == [(p, y, "tester") for p, y in expected.items()]
        assert {p: x.label for p, x in load_label_log(server.log_path).items()} == expected
        records = log_records(server.log_path)
        assert [r["pair_id"] for r in records] == [10, 11, 12, 13, 13, 13, 14]
        assert records[3]["label"] is None and records[4]["undo"] is True and len(records) == 7

        page.press("u")  # pair 14's answer went to training: refused
        page.wait_until(lambda: REFUSED_AFTER_TAKE in page.text("message"))
        assert page.attribute("data-pair-id") == "15" and server.pending() == 3
    finally:
        server.stop()


@needs_chromium
def test_browser_clips_take_the_window_width_and_mark_their_restart(tmp_path, browser):
    """Caught before: clips were drawn at 240 px whatever the window, and a loop's restart looked like a jump in
    the game."""
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(1)
    server = LabelServer(tmp_path / "labels.jsonl", fps=12, env_id="MinAtar/Breakout-v1")
    server.submit(
        0, render_minatar(random_minatar_boards(rng, frames=8)), render_minatar(random_minatar_boards(rng, 8))
    )
    url = server.start()
    try:
        for width, height in ((1400, 1000), (1000, 760), (800, 1200)):
            browser.set_window_size(width, height)
            page = Page(browser, url, "tester")
            page.wait_for_pair(0)
            inner_width, inner_height, page_height = page.script(
                "return [innerWidth, innerHeight, document.documentElement.scrollHeight];"
            )
            canvases = [browser.find_element(By.ID, side).rect for side in ("left", "right")]
            side = canvases[0]["width"]
            assert canvases[1]["width"] == side and canvases[0]["height"] == side  # square boards stay square
            assert side > 300, (width, height, side)
            assert page_height <= inner_height, "the page fits the window: the buttons stay on screen"
            # Width or height is used up: the two clips span the page (less its margins), or the page is as tall
            # as the window.
            spans = canvases[1]["x"] + canvases[1]["width"] - canvases[0]["x"]
            assert spans >= inner_width - 80 or page_height >= inner_height - 2, (width, height, side)
        # The loop's first frames are framed in yellow, and the timeline says which frame is shown: what the page
        # shows, sampled every 10 ms for two loops.
        browser.set_script_timeout(10)
        seen = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1], seen = new Set();
            const sample = setInterval(() => seen.add(JSON.stringify([
              document.getElementById("left").classList.contains("restart"),
              document.getElementById("frame-counter").textContent])), 10);
            setTimeout(() => { clearInterval(sample); done([...seen].map((s) => JSON.parse(s))); }, 1400);
            """
        )
        seen = {tuple(state) for state in seen}
        assert (True, "frame 1 / 8") in seen and (False, "frame 5 / 8") in seen, seen
        assert {counter for restart, counter in seen if restart} == {"frame 1 / 8", "frame 2 / 8", "frame 3 / 8"}
        colour = browser.find_element(By.ID, "left").value_of_css_property("border-top-color")
        assert colour in ("rgba(255, 216, 102, 1)", "rgba(68, 68, 68, 1)")
    finally:
        server.stop()


@needs_chromium
def test_browser_two_pages_label_different_pairs_and_count_their_answers(tmp_path, browser):
    """Two annotators, each in their own window. Caught before: both pages showed the oldest pending pair, so the
    second answer to it was refused and the first page to answer won every pair."""
    from selenium.webdriver.common.keys import Keys

    rng = np.random.default_rng(2)
    server = LabelServer(tmp_path / "labels.jsonl")
    for pair_id in range(20, 26):
        server.submit(pair_id, render_minatar(random_minatar_boards(rng)), render_minatar(random_minatar_boards(rng)))
    url = server.start()
    try:
        alice = Page(browser, url, "alice")
        alice.wait_for_pair(20)
        bob = Page(browser, url, "bob", new_window=True)
        bob.wait_for_pair(21)
        alice.wait_until(lambda: alice.text("counter") == "6 pairs waiting (1 on other pages)", timeout=6)
        alice.wait_for_pair(20)  # alice's page still shows hers
        alice.press(Keys.ARROW_LEFT)
        alice.wait_for_pair(22)  # not bob's 21
        bob.press(Keys.ARROW_RIGHT)
        bob.wait_for_pair(23)
        alice.press(Keys.ARROW_UP)
        alice.wait_for_pair(24)
        assert alice.text("answered") == "(2 answered)" and bob.text("answered") == "(1 answered)"
        bob.focus().driver.close()  # bob leaves with pair 23 on his screen: his page gives it back as it closes
        alice.press(Keys.ARROW_DOWN)
        alice.wait_for_pair(23)
        alice.press(Keys.ARROW_LEFT)
        alice.wait_for_pair(25)
        alice.press(Keys.ARROW_RIGHT)
        alice.wait_until(lambda: alice.attribute("data-state") == "waiting")
        assert "No pairs waiting" in alice.text("waiting") and "already" not in alice.text("message")
        records = log_records(server.log_path)
        assert [(r["pair_id"], r["annotator"]) for r in records] == [
            (20, "alice"),
            (21, "bob"),
            (22, "alice"),
            (24, "alice"),
            (23, "alice"),
            (25, "alice"),
        ]
        assert server.pending() == 0
    finally:
        server.stop()


@needs_chromium
def test_browser_request_over_the_size_limit_gets_413_and_saves_nothing(tmp_path, browser):
    """Caught before: a 50 MB answer posted from the page's origin was read whole and saved."""
    server = LabelServer(tmp_path / "labels.jsonl")
    server.submit(10, clip(0), clip(1))
    url = server.start()
    try:
        page = Page(browser, url, "tester")
        page.wait_for_pair(10)
        browser.set_script_timeout(60)
        result = browser.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const body = JSON.stringify({pair_id: 10, choice: "left", annotator: "big", padding: "x".repeat(50 << 20)});
            fetch("/api/label", {method: "POST", headers: {"Content-Type": "application/json"}, body})
              .then(async (response) => done({status: response.status, body: await response.json()}))
              .catch((error) => done({error: String(error)}));
            """
        )
        assert result == {
            "status": 413,
            "body": {"error": f"the request body is larger than {MAX_REQUEST_BYTES} bytes"},
        }
        assert server.pending() == 1 and server.take_labels() == []
        assert not server.log_path.exists() or server.log_path.read_text() == ""
    finally:
        server.stop()
