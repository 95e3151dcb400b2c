"""Pilots' rules, declared before their runs and applied by their reports: the headroom pilot's label budget per
game, the beta pilot's scale; and the declarations that follow them agree with what the committed pilots chose."""

from __future__ import annotations

import dataclasses

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


# ---------------------------------------------------------------------------------------------------------------
# headroom's success rule, declared before its runs and applied by its page

HEADROOM = BENCHMARKS["headroom"]


def headroom_page(tmp_path, finals: dict[str, list[float]]) -> str:
    """Random play 0 and SAC 10 on SpaceInvaders (from main); each headroom arm's finals over seeds 1.. ."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_finals(layout.results, "main", "SpaceInvaders", "random", [0.0] * 3)
    write_finals(layout.results, "main", "SpaceInvaders", "sac", [10.0] * 3)
    for arm, values in finals.items():
        write_finals(layout.results, "headroom", "SpaceInvaders", arm, values)
    return section(write_report(HEADROOM, layout, reps=200).read_text(), "### The success rule")


def spread(center: float) -> list[float]:
    return [center + 0.1 * k for k in range(10)]


def test_the_success_rule_names_an_arm_only_where_it_beats_drlhf_and_its_placebo(tmp_path):
    """The pooled term above DRLHF and its placebo helps; the latest-pairs arm above DRLHF helps (no placebo); the
    corrected SoBiRL level with DRLHF does not; A-PARL below does not. Breaks if the placebo were not read."""
    rule = headroom_page(
        tmp_path,
        {"drlhf": spread(5.0), "sobirl_corrected": spread(5.05), "sobirl_pooled": spread(8.0),
         "sobirl_placebo": spread(5.0), "sobirl_latest": spread(7.0), "parl_fisher": spread(1.0)},
    )  # fmt: skip
    titles = ("SoBiRL, ratio-baseline correction", "SoBiRL, pooled and capped, beta 0.3",
              "pooled, on the latest phase's pairs", "A-PARL, corrected (Fisher curvature)")  # fmt: skip
    rows = {title: table_rows(rule, title)[0] for title in titles}
    assert [rows[title][5] for title in titles] == ["no", "yes", "yes", "no"]
    assert rows[titles[1]][1] == "1.00: every run above every run of DRLHF"
    assert rows[titles[1]][3] == "1.00: every run above every run of its placebo"
    assert rows[titles[3]][1] == "0.00: every run below every run of DRLHF"
    assert "By the rule, SoBiRL, pooled and capped, beta 0.3 and pooled, on the latest phase's pairs helped." in rule


def test_an_arm_level_with_its_placebo_does_not_help_and_the_rule_waits_for_every_run(tmp_path):
    finals = {"drlhf": spread(5.0), "sobirl_corrected": spread(5.0), "sobirl_pooled": spread(8.0),
              "sobirl_placebo": spread(8.0), "sobirl_latest": spread(5.0), "parl_fisher": spread(5.0)}  # fmt: skip
    rule = headroom_page(tmp_path / "a", finals)
    assert "By the rule, no arm helped." in rule
    pooled = table_rows(rule, "SoBiRL, pooled and capped, beta 0.3")[0]
    assert pooled[1].startswith("1.00: every run above") and pooled[3].startswith("0.5") and pooled[5] == "no"
    rule = headroom_page(tmp_path / "b", {**finals, "parl_fisher": spread(5.0)[:9]})
    assert "Not applied yet: 1 declared runs of the arms it reads are still missing." in rule


def test_a_success_rule_must_read_declared_comparisons():
    from sobirl.harness.declarations import Success

    with pytest.raises(ValueError, match="undeclared comparisons"):
        dataclasses.replace(HEADROOM, comparisons=HEADROOM.comparisons[1:])
    assert set(HEADROOM.success.comparisons()) <= set(HEADROOM.comparisons)
    assert Success("r", "b", (("x", ""), ("y", "z"))).comparisons() == (("x", "b"), ("y", "b"), ("y", "z"))


def test_an_arm_the_benchmark_declares_is_never_filled_from_its_baselines_benchmark(tmp_path):
    """main has 10 DRLHF runs on SpaceInvaders; headroom's own DRLHF has none yet: its comparisons wait (main's
    runs, at another budget, are not headroom's DRLHF). Breaks if the page joined main's runs under that name."""
    layout = Layout(tmp_path / "runs", tmp_path / "results")
    write_finals(layout.results, "main", "SpaceInvaders", "random", [0.0] * 3)
    write_finals(layout.results, "main", "SpaceInvaders", "sac", [10.0] * 3)
    write_finals(layout.results, "main", "SpaceInvaders", "drlhf", spread(1.0))
    write_finals(layout.results, "headroom", "SpaceInvaders", "sobirl_pooled", spread(5.0)[:5])
    page = write_report(HEADROOM, layout, reps=200).read_text()
    row = table_rows(section(page, "## Probability of improvement"), "SoBiRL, pooled and capped, beta 0.3 vs DRLHF")
    assert row[0][1:3] == ["0", "— (fewer than 5 runs)"]
