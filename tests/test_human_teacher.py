"""The human teacher: pairs waiting for a person (answers through the page's HTTP API, no browser), a resumed run's
pending pairs, and a whole MinAtar DRLHF run labelled by this test, then replayed from its label log."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flask")

import agents.feedback.labelling as labelling  # noqa: E402
from agents import drlhf  # noqa: E402
from agents.feedback.labelling import load_label_log, shown_left_for  # noqa: E402
from agents.feedback.teachers import HumanTeacher, fragment_clip  # noqa: E402
from tests.conftest import REPO, only_run_dir, scalar_tags, tiny_preference_flags  # noqa: E402
from tests.test_teachers import queries  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def post_label(url: str, pair_id: int, choice: str) -> dict:
    request = urllib.request.Request(
        url + "api/label",
        data=json.dumps({"pair_id": pair_id, "choice": choice, "annotator": "test"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def first_label(teacher_choice: str, pair_id: int) -> float | None:
    """The label a page answer stores for `pair_id` (the page shows the fragments in a seeded order)."""
    left = shown_left_for(pair_id)
    return {"left": 1.0 if left == 1 else 0.0, "right": 0.0 if left == 1 else 1.0, "equal": 0.5, "skip": None}[
        teacher_choice
    ]


@pytest.fixture
def teachers():
    started = []

    def make(**kwargs) -> HumanTeacher:
        teacher = HumanTeacher(**kwargs)
        started.append(teacher)
        return teacher

    yield make
    for teacher in started:
        teacher.stop()


def test_fragment_clips_draw_minatar_boards_and_the_newest_atari_frame_per_step():
    boards = torch.zeros(5, 4, 10, 10, dtype=torch.uint8)
    boards[2, 1, 3, 4] = 1
    clip = fragment_clip(boards, 5, labelling)
    assert clip.shape == (5, 240, 240, 3) and clip.dtype == np.uint8
    assert clip[2].any() and not clip[1].any()
    frames = torch.arange(28, dtype=torch.uint8).view(28, 1, 1).expand(28, 84, 84)  # 25 steps, stack 4
    clip = fragment_clip(frames, 25, labelling)
    assert clip.shape == (25, 336, 336, 3)
    assert clip[:, 0, 0, 0].tolist() == list(range(3, 28)), "step h shows frames[h + stack - 1]"


def test_async_collect_takes_the_answers_so_far_and_keeps_the_rest_pending(tmp_path, teachers):
    teacher = teachers()
    assert teacher.start(tmp_path / "labels.jsonl", next_pair_id=0) == 0
    teacher.submit([0, 1, 2], queries([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))
    assert get(teacher.url + "api/next")["pending"] == 3
    post_label(teacher.url, 0, "left")
    post_label(teacher.url, 2, "skip")
    answered, dropped = teacher.collect(wait=False)
    assert [int(p.frames1[0, 0, 0, 0, 0]) for p in answered] == [0] and dropped == 1
    assert answered[0].labels.tolist() == [first_label("left", 0)]
    assert list(teacher.pending) == [1]
    post_label(teacher.url, 1, "equal")
    answered, dropped = teacher.collect(wait=False)
    assert [p.labels.item() for p in answered] == [0.5] and not teacher.pending


def test_sync_collect_waits_for_every_pending_pair_and_stops_on_request(tmp_path, teachers):
    teacher = teachers()
    teacher.start(tmp_path / "labels.jsonl", next_pair_id=0)
    teacher.submit([0, 1], queries([1.0, 2.0], [0.0, 0.0]))

    def annotate():
        for pair_id in (0, 1):
            time.sleep(0.1)
            post_label(teacher.url, pair_id, "right")

    thread = threading.Thread(target=annotate)
    thread.start()
    answered, dropped = teacher.collect(wait=True)
    thread.join()
    assert len(answered) == 2 and dropped == 0 and not teacher.pending

    class Stop(Exception):
        pass

    def check():
        raise Stop

    teacher.submit([2, 3], queries([1.0, 2.0], [0.0, 0.0]))
    post_label(teacher.url, 2, "left")
    with pytest.raises(Stop):
        teacher.collect(wait=True, stopping=lambda: True, check=check)
    assert list(teacher.pending) == [2, 3], "a stopped wait keeps its pairs, answered or not, for the checkpoint"
    answered, _ = teacher.collect(wait=False)
    assert [int(p.frames1[0, 0, 0, 0, 0]) for p in answered] == [0], "pair 2 (the first of its batch), taken before"
    assert list(teacher.pending) == [3]


def test_a_sync_wait_counts_down_as_pairs_are_answered(tmp_path, teachers):
    """Caught before: the bar said "label: 3 pairs" until the last answer came."""
    teacher = teachers()
    teacher.refresh_every = 0.05
    teacher.start(tmp_path / "labels.jsonl", next_pair_id=0)
    teacher.submit([0, 1, 2], queries([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))

    def annotate():
        for pair_id in (0, 1, 2):
            time.sleep(0.3)
            post_label(teacher.url, pair_id, "left")

    thread = threading.Thread(target=annotate)
    thread.start()
    shown = []
    answered, _ = teacher.collect(wait=True, show=shown.append)
    thread.join()
    assert len(answered) == 3
    assert sorted(set(shown), reverse=True) == [3, 2, 1] and shown == sorted(shown, reverse=True), shown


def test_resume_takes_answers_given_after_the_checkpoint_and_queues_the_rest_again(tmp_path, teachers):
    log = tmp_path / "labels.jsonl"
    teacher = teachers()
    teacher.start(log, next_pair_id=0)
    teacher.submit([0, 1, 2], queries([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))
    checkpoint = teacher.state_dict()
    # After the checkpoint: pair 0 is answered (and taken), pair 5 of a later query is answered; then the run dies.
    post_label(teacher.url, 0, "left")
    teacher.collect(wait=False)
    teacher.submit([5], queries([1.0], [0.0]))
    post_label(teacher.url, 5, "left")
    teacher.stop()

    resumed = teachers()
    resumed.load_state_dict(checkpoint, "cpu")
    assert list(resumed.pending) == [0, 1, 2]
    assert resumed.start(log, next_pair_id=3) == 6, "ids continue past the answers to pairs the checkpoint lost"
    answered, dropped = resumed.collect(wait=False)
    assert [int(p.frames1[0, 0, 0, 0, 0]) for p in answered] == [0], "pair 0's answer comes back from the log"
    assert answered[0].labels.tolist() == [first_label("left", 0)]
    assert get(resumed.url + "api/next")["pending"] == 2, "pairs 1 and 2 are shown again"
    post_label(resumed.url, 1, "left")
    post_label(resumed.url, 2, "left")
    answered, _ = resumed.collect(wait=True)
    assert len(answered) == 2 and not resumed.pending
    assert set(load_label_log(log)) == {0, 1, 2, 5}


def test_a_resumed_run_serves_the_page_on_its_port_again_when_it_is_free(tmp_path, teachers, capsys):
    """Caught before: every resume served the page on a new free port, so a tab left open went dead."""
    log = tmp_path / "labels.jsonl"
    first = teachers()
    first.open(tmp_path, next_pair_id=0)
    port = first.server.port
    checkpoint = first.state_dict()
    assert checkpoint["port"] == port
    first.stop()

    resumed = teachers()
    resumed.load_state_dict(checkpoint, "cpu")
    resumed.open(tmp_path, next_pair_id=0)
    assert resumed.server.port == port and resumed.state_dict()["port"] == port
    out = capsys.readouterr()
    assert f"label preferences at http://127.0.0.1:{port}/" in out.out and out.err == ""
    resumed.stop()

    with socket.socket() as busy:  # the port is taken meanwhile: a free one, and a note that says so
        busy.bind(("127.0.0.1", port))
        busy.listen()
        moved = teachers()
        moved.load_state_dict(checkpoint, "cpu")
        moved.open(tmp_path, next_pair_id=0)
        assert moved.server.port not in (0, port)
        out = capsys.readouterr()
        assert f"label preferences at {moved.url}" in out.out
        assert f"note: port {port}, where the stopped run served the page, is taken" in out.err
        assert f"the page moved to {moved.url}" in out.err
        moved.stop()
    # --label-port given on resume wins over the recorded port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        chosen = probe.getsockname()[1]
    explicit = teachers(port=chosen)
    explicit.load_state_dict(checkpoint, "cpu")
    explicit.start(log, next_pair_id=0)
    assert explicit.server.port == chosen


def test_a_port_in_use_is_an_error_not_an_exit(tmp_path, teachers):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            teachers(port=busy.getsockname()[1]).start(tmp_path / "labels.jsonl", next_pair_id=0)


# ---------------------------------------------------------------------------------------------------------------
# A whole run

TINY_MINATAR = tiny_preference_flags(env_id="MinAtar/Breakout-v1", total_timesteps="400")
CHOICES = ("skip", "left", "right", "equal")  # the answer to pair i is CHOICES[i % 4]


def label_a_run(runs_dir: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run DRLHF with --teacher human --label-mode sync, answering its pairs through the HTTP API until it ends."""
    pytest.importorskip("minatar")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "agents/drlhf.py"),
            *TINY_MINATAR,
            "--runs-dir",
            str(runs_dir),
            "--teacher",
            "human",
            "--label-mode",
            "sync",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []
    url: list[str] = []
    found = threading.Event()

    def read(stream):
        for line in stream:
            output.append(line)
            match = re.search(r"label preferences at (http://\S+)", line)
            if match:
                url.append(match.group(1))
                found.set()

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    answered: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while not found.wait(0.05):
            assert process.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
        while process.poll() is None:
            assert time.monotonic() < deadline, "".join(output)
            try:
                pair = get(url[0] + "api/next")["pair"]
            except OSError:  # the run is shutting its server down
                break
            if pair is None:
                time.sleep(0.02)
                continue
            post_label(url[0], pair["pair_id"], CHOICES[pair["pair_id"] % len(CHOICES)])
            answered.append(pair["pair_id"])
        process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
    for reader in readers:
        reader.join(timeout=5)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(output), ""), answered


def test_a_run_labelled_through_the_page_then_replayed_from_its_log(tmp_path):
    result, answered = label_a_run(tmp_path / "human")
    assert result.returncode == 0, result.stdout[-3000:]
    # Reward phases at steps 41, 141, 241, 341: 4 warm-up pairs, then 2 per iteration, each answered in turn.
    assert answered == list(range(10))
    run_dir = only_run_dir(tmp_path / "human")
    log = load_label_log(run_dir / "labels.jsonl")
    assert {pair_id: label.label for pair_id, label in log.items()} == {
        pair_id: first_label(CHOICES[pair_id % 4], pair_id) for pair_id in range(10)
    }
    tags = scalar_tags(run_dir)
    # Pairs 0, 4 and 8 were answered "can't tell": dropped, not stored.
    assert [value for _, value in tags["reward/dropped_pairs"]] == [1, 1, 0, 1]
    assert [value for _, value in tags["reward/num_pairs"]] == [3, 4, 6, 7]
    assert [value for _, value in tags["reward/pending_pairs"]] == [0, 0, 0, 0]

    # The same run with --teacher replay (in this process: no second start-up) queries the same pairs, with the
    # same ids, and learns the same reward.
    drlhf.main(
        [
            *TINY_MINATAR,
            "--runs-dir",
            str(tmp_path / "replay"),
            "--teacher",
            "replay",
            "--labels",
            str(run_dir / "labels.jsonl"),
        ]
    )
    replayed = scalar_tags(only_run_dir(tmp_path / "replay"))
    for tag in ("reward/num_pairs", "reward/dropped_pairs", "reward/bce"):
        assert replayed[tag] == tags[tag], tag
    assert [value for _, value in replayed["reward/unlabelled_pairs"]] == [0, 0, 0, 0]


# The command the docs give a person (tens of pairs, a few minutes of training between queries): 20 warm-up pairs,
# then 11, 9, 8, 6 and 6 over five queries; 30,000 agent steps between queries.
PERSON_SIZED = (
    "python sobirl/beamrider.py --algo drlhf --teacher human --env-id MinAtar/Breakout-v1 --initial-pairs 20 "
    "--total-pairs 60 --schedule-iterations 5 --inner-steps 30000 --learning-starts 1000 "
    "--total-timesteps 180000 --buffer-size 100000"
)


def start_until_url(argv: list[str], timeout: float = 120) -> tuple[subprocess.Popen, str, list[str]]:
    """Start a run; return it, its page's URL once printed, and its output so far (kept growing by a thread)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    found = threading.Event()

    def read():
        for line in process.stdout:
            output.append(line)
            if "label preferences at" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("".join(output))
    return process, re.search(r"label preferences at (http://\S+)", "".join(output)).group(1), output


def test_the_person_sized_command_starts_and_resumes_on_the_same_page(tmp_path):
    """The documented command parses and starts: its 20 warm-up pairs wait on the page; stopped and resumed, the
    run says where it continues and serves the page at the same address."""
    pytest.importorskip("minatar")
    import shlex

    argv = shlex.split(PERSON_SIZED)[1:] + ["--runs-dir", str(tmp_path), "--no-progress"]
    first, url, output = start_until_url(argv)
    try:
        deadline = time.monotonic() + 60
        while get(url + "api/next")["pending"] < 20:  # the rollout's fragments are submitted as they are drawn
            assert time.monotonic() < deadline
            time.sleep(0.2)
        next_pair = get(url + "api/next?page=p&annotator=me")
        assert next_pair["pending"] == 20 and next_pair["answered"] == 0
        post_label(url, next_pair["pair"]["pair_id"], "left")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 130, "".join(output)
    finally:
        first.kill()
    assert "checkpoint saved; continue with:" in "".join(output)
    run_dir = only_run_dir(tmp_path)

    resumed, resumed_url, output = start_until_url([str(REPO / "sobirl/beamrider.py"), "--resume", str(run_dir)])
    try:
        assert resumed_url == url, "".join(output)
        assert "resumed at step 1,001 of 180,000" in "".join(output)
        assert get(url + "api/next")["pending"] == 19  # the answered pair was collected from the log
        resumed.send_signal(signal.SIGINT)
        assert resumed.wait(timeout=60) == 130, "".join(output)
    finally:
        resumed.kill()
