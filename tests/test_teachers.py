"""Teachers: B-Pref's imperfect teacher on hand-made rewards, its flags and presets, the replay teacher on a small label
log, and the label step of the preference learner (pair ids, skipped and unanswered pairs)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from agents import drlhf
from agents.feedback.pairs import PairBatch
from agents.feedback.teachers import BPREF_PRESETS, BPrefTeacher, ReplayTeacher, make_teacher, oracle_labels
from agents.infra.cli import UsageError, parse_args
from agents.infra.run import detached_run
from agents.pipeline.learner import PreferenceLearner
from tests.conftest import cli_error

pytestmark = pytest.mark.usefixtures("single_thread")


def rewards_with_returns(*returns: float, length: int = 4) -> torch.Tensor:
    """(B, length) per-step rewards whose sums are `returns`, all reward on the last step."""
    rewards = torch.zeros(len(returns), length)
    rewards[:, -1] = torch.tensor(returns)
    return rewards


# ---------------------------------------------------------------------------------------------------------------
# B-Pref's teacher


def test_deterministic_teacher_prefers_the_higher_return_and_ties_are_half():
    r1 = rewards_with_returns(3.0, 0.0, 2.0, -1.0, 0.0)
    r2 = rewards_with_returns(1.0, 1.0, 2.0, -1.0, -0.5)
    for beta in (-1.0, 0.0):  # beta <= 0: the higher return wins
        labels, keep = BPrefTeacher(beta=beta).label_rewards(r1, r2, torch.Generator().manual_seed(0))
        assert labels.tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]
        assert keep.all()


def test_noisy_teacher_samples_bradley_terry_labels_with_rationality_beta():
    n, beta = 20_000, 0.5
    gaps = torch.tensor([1.0, -2.0, 4.0, 0.0])
    r1 = rewards_with_returns(*gaps.repeat_interleave(n).tolist())
    labels, _ = BPrefTeacher(beta=beta).label_rewards(r1, torch.zeros_like(r1), torch.Generator().manual_seed(0))
    by_gap = labels.view(len(gaps), n)
    assert set(by_gap[:3].unique().tolist()) == {0.0, 1.0}
    assert (by_gap[:3].mean(1) - torch.sigmoid(beta * gaps[:3])).abs().max() < 0.015
    assert (by_gap[3] == 0.5).all(), "equal returns are a tie, not a coin flip"


def test_mistakes_flip_labels_at_the_given_rate_and_leave_ties():
    n = 20_000
    r1 = rewards_with_returns(*([1.0] * n + [0.0] * 100))
    r2 = torch.zeros_like(r1)
    labels, _ = BPrefTeacher(eps_mistake=0.1).label_rewards(r1, r2, torch.Generator().manual_seed(0))
    assert abs((labels[:n] == 0.0).float().mean().item() - 0.1) < 0.01
    assert set(labels[:n].unique().tolist()) == {0.0, 1.0}
    assert (labels[n:] == 0.5).all()
    always, _ = BPrefTeacher(eps_mistake=1.0).label_rewards(r1[:3], r2[:3])
    assert always.tolist() == [0.0, 0.0, 0.0]


def test_skip_drops_pairs_whose_returns_are_both_at_most_eps_times_the_mean_abs_return():
    # Mean |return| over the 8 fragments: (10 + 0 + 2 + 1 + 4 + 3 + 0 + 0) / 8 = 2.5; eps 0.5 -> threshold 1.25.
    r1 = rewards_with_returns(10.0, 0.0, 2.0, 1.0)
    r2 = rewards_with_returns(4.0, -3.0, 0.0, 0.0)
    teacher = BPrefTeacher(eps_skip=0.5)
    assert teacher.thresholds(r1.sum(1), r2.sum(1)) == (1.25, 0.0)
    labels, keep = teacher.label_rewards(r1, r2)
    assert keep.tolist() == [True, False, True, False]
    assert labels[keep].tolist() == [1.0, 1.0]
    assert labels[~keep].isnan().all()
    # All returns zero: the threshold is 0 and nothing is skipped (the pairs are ties).
    labels, keep = teacher.label_rewards(torch.zeros(3, 4), torch.zeros(3, 4))
    assert keep.all() and labels.tolist() == [0.5] * 3


def test_equal_labels_half_when_the_gap_is_below_eps_times_the_mean_abs_return():
    # Mean |return| = (10 + 9 + 1 + 4) / 4 = 6; eps 0.2 -> threshold 1.2: gaps 1 (equal) and 3 (not).
    r1, r2 = rewards_with_returns(10.0, 4.0), rewards_with_returns(9.0, 1.0)
    labels, _ = BPrefTeacher(eps_equal=0.2).label_rewards(r1, r2)
    assert labels.tolist() == [0.5, 1.0]
    # "Equal" is decided after the mistakes (B-Pref's order), so mistakes never touch those pairs.
    labels, _ = BPrefTeacher(eps_equal=0.2, eps_mistake=1.0).label_rewards(r1, r2)
    assert labels.tolist() == [0.5, 0.0]


def test_myopic_teacher_weighs_step_t_by_gamma_to_the_steps_after_it():
    teacher = BPrefTeacher(gamma=0.9)
    assert torch.allclose(teacher.myopic_weights(4), torch.tensor([0.9**3, 0.9**2, 0.9, 1.0], dtype=torch.float64))
    # Fragment 1 earns 1.0 at its first step, fragment 2 0.8 at its last: 0.729 < 0.8, so the myopic teacher
    # prefers fragment 2 although fragment 1's return is higher.
    r1 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    r2 = torch.tensor([[0.0, 0.0, 0.0, 0.8]])
    assert BPrefTeacher(gamma=0.9).label_rewards(r1, r2)[0].tolist() == [0.0]
    assert BPrefTeacher(gamma=1.0).label_rewards(r1, r2)[0].tolist() == [1.0]
    # Equal myopic returns are a tie: 1 at the last step against 2 one step earlier, at gamma 0.5.
    r3 = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    r4 = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    assert BPrefTeacher(gamma=0.5).label_rewards(r3, r4)[0].tolist() == [0.5]


def test_presets_are_the_papers_teachers_and_the_oracle_matches_the_oracle_teacher():
    assert BPREF_PRESETS == {
        "oracle": BPrefTeacher(-1.0, 1.0, 0.0, 0.0, 0.0),
        "mistake": BPrefTeacher(eps_mistake=0.1),
        "noisy": BPrefTeacher(beta=1.0),
        "skip": BPrefTeacher(eps_skip=0.1),
        "myopic": BPrefTeacher(gamma=0.9),
        "equal": BPrefTeacher(eps_equal=0.1),
    }
    r1 = torch.randint(-2, 3, (500, 5)).float()
    r2 = torch.randint(-2, 3, (500, 5)).float()
    labels, keep = BPREF_PRESETS["oracle"].label_rewards(r1, r2)
    assert keep.all() and torch.equal(labels, oracle_labels(r1.sum(1), r2.sum(1)))


def test_teacher_randomness_follows_the_generator():
    r1 = torch.randn(200, 5)
    r2 = torch.randn(200, 5)
    teacher = BPrefTeacher(beta=1.0, eps_mistake=0.2)
    first = teacher.label_rewards(r1, r2, torch.Generator().manual_seed(3))[0]
    assert torch.equal(first, teacher.label_rewards(r1, r2, torch.Generator().manual_seed(3))[0])
    assert not torch.equal(first, teacher.label_rewards(r1, r2, torch.Generator().manual_seed(4))[0])


# ---------------------------------------------------------------------------------------------------------------
# Flags


def test_preset_flags_set_the_teacher_parameters():
    args = parse_args(drlhf.Args, ["--teacher", "bpref", "--bpref-preset", "myopic"])
    args.validate()
    assert args.bpref_teacher() == BPrefTeacher(gamma=0.9)
    # Re-built from its own values, as a resumed run is, the preset agrees with itself.
    assert drlhf.Args(**vars(args)).bpref_teacher() == BPrefTeacher(gamma=0.9)
    args = parse_args(drlhf.Args, ["--teacher", "bpref", "--teacher-beta", "2", "--teacher-eps-skip", "0.3"])
    assert args.bpref_teacher() == BPrefTeacher(beta=2.0, eps_skip=0.3)


@pytest.mark.parametrize(
    "flags,words",
    [
        (
            ["--teacher", "bpref", "--bpref-preset", "noisy", "--teacher-beta", "3"],
            ["--bpref-preset", "--teacher-beta"],
        ),
        (["--bpref-preset", "skip"], ["--bpref-preset", "--teacher bpref"]),
        (["--teacher-eps-mistake", "0.1"], ["--teacher-eps-mistake", "--teacher bpref"]),
        (["--teacher", "bpref", "--teacher-eps-mistake", "1.5"], ["--teacher-eps-mistake"]),
        (["--teacher", "bpref", "--teacher-gamma", "1.1"], ["--teacher-gamma"]),
        (["--teacher", "bpref", "--teacher-eps-skip", "-0.1"], ["--teacher-eps-skip"]),
        (["--bpref-preset", "lazy"], ["--bpref-preset"]),
        (["--label-mode", "async"], ["--label-mode", "--teacher human"]),
        (["--teacher", "human", "--label-port", "70000"], ["--label-port"]),
        (["--labels", "x.jsonl"], ["--labels", "--teacher replay"]),
        (["--teacher", "replay"], ["--labels"]),
        (["--teacher", "replay", "--labels", "no/such/labels.jsonl"], ["--labels", "no such file"]),
    ],
)
def test_bad_teacher_flags_are_one_line_errors(flags, words, tmp_path, capsys):
    line = cli_error(drlhf.main, [*flags, "--runs-dir", str(tmp_path)], capsys)
    assert all(word in line for word in words), line
    assert not any(tmp_path.iterdir()), "bad input creates no run directory"


def test_label_flags_may_change_on_resume():
    assert {"label_port", "label_mode"} <= drlhf.Args.RESUMABLE
    assert not {"teacher", "labels", "teacher_beta", "bpref_preset"} & drlhf.Args.RESUMABLE


# ---------------------------------------------------------------------------------------------------------------
# Replay


def write_log(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def answer(pair_id: int, label, annotator: str = "alice") -> dict:
    return {"pair_id": pair_id, "label": label, "annotator": annotator, "time": 1.0, "shown_left": 1}


def test_replay_teacher_answers_the_pairs_its_log_covers(tmp_path):
    log = tmp_path / "labels.jsonl"
    write_log(
        log,
        [
            answer(0, 1.0),
            answer(1, 0.0),
            answer(2, 0.5),
            answer(3, None),
            answer(5, 1.0),
            {"pair_id": 5, "undo": True, "annotator": "alice", "time": 2.0},
            answer(5, 0.0),
        ],
    )
    teacher = ReplayTeacher.from_log(str(log))
    labels, covered = teacher.answers_for([0, 1, 2, 3, 4, 5, 6])
    assert covered.tolist() == [True, True, True, True, False, True, False]
    assert labels[covered & ~labels.isnan()].tolist() == [1.0, 0.0, 0.5, 0.0]  # the undo is applied
    assert labels[3].isnan(), "can't tell"


@pytest.mark.parametrize(
    "content,words",
    [
        (None, ["--labels", "no such file"]),
        ("not json\n" + json.dumps(answer(1, 1.0)) + "\n", ["--labels", "line 1"]),
        (json.dumps(answer(1, 1.0)) + "\n" + json.dumps(answer(1, 0.0)) + "\n", ["--labels", "answered again"]),
        ("", ["--labels", "no answers"]),
    ],
)
def test_replay_refuses_a_missing_or_corrupt_log_naming_labels(tmp_path, content, words):
    log = tmp_path / "labels.jsonl"
    if content is not None:
        log.write_text(content)
    with pytest.raises(UsageError) as error:
        ReplayTeacher.from_log(str(log))
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


# ---------------------------------------------------------------------------------------------------------------
# The label step of the learner


class Recorder:
    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, value))


def label_step(flags: list[str]) -> PreferenceLearner:
    """A PreferenceLearner with only what its label step uses (no environment, networks or replay)."""
    args = parse_args(drlhf.Args, flags)
    args.validate()
    learner = object.__new__(PreferenceLearner)
    learner.args = args
    learner.trainer = SimpleNamespace(global_step=41)
    learner.run = detached_run(args)
    learner.run.logger = Recorder()
    learner.pairs_queried = 0
    learner.label_generator = torch.Generator().manual_seed(0)
    learner.iteration = 1
    learner.teacher = make_teacher(args)
    return learner


def queries(returns1: list[float], returns2: list[float], length: int = 3) -> PairBatch:
    n = len(returns1)
    r1, r2 = rewards_with_returns(*returns1, length=length), rewards_with_returns(*returns2, length=length)
    frames = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1, 1).expand(n, length, 2, 10, 10).clone()
    actions = torch.zeros(n, length, dtype=torch.long)
    return PairBatch(
        frames,
        actions,
        frames + 100,
        actions,
        torch.full((n,), math.nan),
        r1.sum(1),
        r2.sum(1),
        rewards1=r1,
        rewards2=r2,
    )


def test_label_step_gives_pair_ids_and_drops_skipped_pairs():
    learner = label_step(["--teacher", "bpref", "--teacher-eps-skip", "0.5"])
    # Mean |return| = 10 / 8 -> threshold 0.625: the (0, 0) and (0.5, -0.5) pairs are skipped.
    stored = learner.label(queries([4.0, 0.0, 0.5, 3.0], [0.0, 0.0, -0.5, 2.0]))
    assert stored.labels.tolist() == [1.0, 1.0]
    assert stored.frames1[:, 0, 0, 0, 0].tolist() == [0, 3], "the kept pairs, in order"
    assert stored.rewards1 is not None and len(stored.rewards1) == 2
    assert learner.pairs_queried == 4, "skipped pairs were queried too"
    learner.label(queries([1.0], [0.0]))
    assert learner.pairs_queried == 5
    assert learner.run.logger.scalars["reward/dropped_pairs"] == [(41, 2), (41, 0)]


def test_label_step_replays_the_log_by_pair_id_and_counts_the_pairs_it_misses(tmp_path):
    log = tmp_path / "labels.jsonl"
    write_log(log, [answer(0, 0.0), answer(1, None), answer(3, 0.5), answer(4, 1.0)])
    learner = label_step(["--teacher", "replay", "--labels", str(log)])
    first = learner.label(queries([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]))  # ids 0, 1, 2
    second = learner.label(queries([1.0, 1.0], [0.0, 0.0]))  # ids 3, 4
    assert first.labels.tolist() == [0.0] and first.frames1[:, 0, 0, 0, 0].tolist() == [0]
    assert second.labels.tolist() == [0.5, 1.0], "the log's labels, not the returns"
    scalars = learner.run.logger.scalars
    assert scalars["reward/dropped_pairs"] == [(41, 1), (41, 0)]
    assert scalars["reward/unlabelled_pairs"] == [(41, 1), (41, 0)]
    assert learner.label(queries([1.0], [0.0])).labels.numel() == 0  # id 5: not in the log


def test_the_label_step_leaves_a_persons_time_out_of_the_eta(monkeypatch):
    """The learner times the teacher's label step and takes it out of the progress bar's ETA (a person takes
    minutes; before, the ETA just after the first wait was about 5 times too long)."""
    import agents.pipeline.learner as learner_module

    learner = label_step([])
    now = [100.0]
    monkeypatch.setattr(learner_module.time, "time", lambda: now[0])
    excluded = []
    learner.run.progress.exclude_from_eta = excluded.append
    real_label = learner.teacher.label

    def slow_label(*args):
        now[0] += 240.0
        return real_label(*args)

    learner.teacher.label = slow_label
    learner.label(queries([1.0], [0.0]))
    assert excluded == [240.0]
