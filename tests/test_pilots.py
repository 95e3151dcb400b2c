"""Pilots' rules, declared before their runs and applied by their reports: the headroom pilot's label budget per
game, the beta pilot's scale; and the declarations that follow them agree with what the committed pilots chose."""

from __future__ import annotations

import pytest

from sobirl.harness.declarations import (
    BENCHMARKS,
    BETA_PILOT_LABELS,
    HEADROOM_BETA,
    HEADROOM_BUDGETS,
    highest_smaller_on_tie,
    largest_budget_with_room,
)
from sobirl.harness.jobs import Layout
from sobirl.harness.report import baselines, by_cell, pilot_choices, write_report
from sobirl.harness.summaries import load_results
from tests.conftest import REPO
from tests.test_benchmark import section, table_rows, write_finals

PILOT = BENCHMARKS["headroom_pilot"]
SEEDS = [301, 302, 303]


def test_the_headroom_rule_keeps_the_largest_budget_at_or_below_the_ceiling():
    assert largest_budget_with_room([("b50", 0.5), ("b100", 0.8), ("b250", 0.81)]) == "b100"  # 0.8 itself has room
    assert largest_budget_with_room([("b50", 0.7), ("b100", 0.9), ("b250", 0.75)]) == "b250"  # not the first
    assert largest_budget_with_room([("b50", 0.95), ("b100", 1.1)]) is None


def test_the_beta_rule_takes_the_highest_iqm_to_two_decimals_and_the_smaller_beta_on_a_tie():
    assert highest_smaller_on_tie([("small", 0.601), ("middle", 0.604), ("large", 0.59)]) == "small"
    assert highest_smaller_on_tie([("small", 0.5), ("middle", 0.62), ("large", 0.61)]) == "middle"
    assert highest_smaller_on_tie([("small", 0.5), ("middle", 0.6), ("large", 0.7)]) == "large"


def test_the_pilot_page_chooses_a_game_only_once_all_its_runs_are_in(tmp_path):
    """Random play 0 and SAC 10 normalise every game. SpaceInvaders: IQMs 0.5, 0.8, 0.9 -> 100 labels; Breakout: no
    budget at or below 0.8 -> it leaves; Seaquest: a run missing -> nothing chosen yet, though 50 labels has room."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    for game in PILOT.games:
        write_finals(layout.results, "main", game, "random", [0.0] * 3)
        write_finals(layout.results, "main", game, "sac", [10.0] * 3)
    for arm, finals in (("drlhf_50", [5.0] * 3), ("drlhf_100", [7.0, 8.0, 9.0]), ("drlhf_250", [9.0] * 3)):
        write_finals(layout.results, "headroom_pilot", "SpaceInvaders", arm, finals, SEEDS)
    for arm in PILOT.arm_names:
        write_finals(layout.results, "headroom_pilot", "Breakout", arm, [9.5] * 3, SEEDS)
    write_finals(layout.results, "headroom_pilot", "Seaquest", "drlhf_50", [1.0] * 3, SEEDS)
    write_finals(layout.results, "headroom_pilot", "Seaquest", "drlhf_100", [9.0] * 2, SEEDS[:2])
    write_finals(layout.results, "headroom_pilot", "Seaquest", "drlhf_250", [9.0] * 3, SEEDS)
    page = write_report(PILOT, layout, reps=50).read_text()
    rule = section(page, "## The rule's choice")
    chosen = {row[0]: row[1] for row in table_rows(rule, "SpaceInvaders") + table_rows(rule, "Breakout") if row[4]}
    assert chosen == {"SpaceInvaders": "DRLHF, 100 labels"}
    assert "- SpaceInvaders: DRLHF, 100 labels." in rule
    assert "- Breakout: no arm meets the rule; the game leaves what this pilot informs." in rule
    assert "- Seaquest: not chosen yet, 1 declared runs still missing." in rule
    assert not any(row[4] for row in table_rows(rule, "Seaquest"))


def committed_choices(name: str) -> dict:
    results = REPO / "docs/results"
    bench = BENCHMARKS[name]
    cells = by_cell(load_results(results, name))
    base, _ = baselines(by_cell(load_results(results, bench.baselines_from)), bench.games, "random", "sac")
    return pilot_choices(bench, cells, base)


@pytest.mark.skipif(not (REPO / "docs/results/headroom_pilot").is_dir(), reason="no committed headroom pilot")
def test_the_beta_pilot_runs_at_the_budget_the_headroom_pilot_chose_for_spaceinvaders():
    choice = committed_choices("headroom_pilot")["SpaceInvaders"]
    assert choice.waiting == 0 and choice.chosen == f"drlhf_{BETA_PILOT_LABELS}"
    beta_pilot = BENCHMARKS["beta_pilot"]
    assert {beta_pilot.labels(arm) for arm in beta_pilot.arms} == {BETA_PILOT_LABELS}


@pytest.mark.skipif(not (REPO / "docs/results/beta_pilot").is_dir(), reason="no committed beta pilot")
def test_headroom_runs_the_games_budgets_and_beta_the_committed_pilots_chose():
    budgets = {}
    for game, choice in committed_choices("headroom_pilot").items():
        assert choice.waiting == 0
        if choice.chosen is not None:
            budgets[game] = PILOT.labels(PILOT.arm(choice.chosen))
    assert budgets == HEADROOM_BUDGETS
    beta = committed_choices("beta_pilot")["SpaceInvaders"]
    assert beta.waiting == 0 and beta.chosen == f"pooled_beta{HEADROOM_BETA}"
    headroom = BENCHMARKS["headroom"]
    assert headroom.games == tuple(budgets)
    assert {headroom.labels(arm) for arm in headroom.arms} == set(budgets.values())
    pooled_arms = [arm for arm in headroom.arms if "--implicit-pooling" in arm.flags]
    assert len(pooled_arms) == 3 and {headroom.flag(arm, "--implicit-scale") for arm in pooled_arms} == {HEADROOM_BETA}
