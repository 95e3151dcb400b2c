"""The benchmarks: each one's games, budget, shared flags and arms. The one file to edit to add a benchmark or an arm.

A benchmark is declared once, in BENCHMARKS: its games, its budget, the flags every run shares and its arms (name,
algorithm, flags, how many seeds). `python sobirl/benchmark.py list NAME` prints every job's full command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from agents.infra.cli import UsageError


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # folder and legend key; also the run's --exp-name
    algo: str  # --algo of sobirl/beamrider.py
    flags: tuple[str, ...] = ()
    label: str = ""  # legend text
    seeds: int = 5  # the arm runs seeds 1..seeds
    frozen_from: str = ""  # SAC from scratch on the final reward model of this arm's run (same game and seed)
    demos: bool = False  # AIHF: --demos, recorded from the benchmark's demonstration source (Benchmark.demos)
    # Label efficiency: the arm (of this benchmark or of its baselines_from) whose label curve this arm is a point
    # of, at the labels its runs use (Benchmark.labels).
    curve: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclasses.dataclass(frozen=True)
class Choice:
    """A pilot's rule, declared before its runs and applied by its report: on each game, once every declared run of
    that game has finished, `pick` gets each arm's normalised IQM of final return, in the order the arms are declared,
    and names the chosen arm, or None when the rule keeps none (the game leaves what the pilot informs)."""

    rule: str
    pick: Callable[[Sequence[tuple[str, float]]], str | None]


@dataclasses.dataclass(frozen=True)
class Success:
    """A benchmark's success rule, declared before its runs and applied by its report once every declared run of
    the arms it names has finished: an arm helps where its probability of improvement over `baseline` has its 95%
    interval above 0.5 and, where it has a placebo, its probability of improvement over the placebo has too."""

    rule: str
    baseline: str
    arms: tuple[tuple[str, str], ...]  # (arm, its placebo or "")

    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """The comparisons the rule reads, which the benchmark must declare (its Bonferroni count includes them)."""
        return tuple(pair for arm, placebo in self.arms for pair in ((arm, self.baseline), (arm, placebo)) if pair[1])


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    games: tuple[str, ...]
    steps: int  # env steps of every run
    common: tuple[str, ...]  # flags every run shares
    arms: tuple[Arm, ...]
    # Scores are normalised per game as (score - random) / (sac - random) with these arms' mean final returns,
    # taken from `baselines_from` (another benchmark's results) when this one does not run them.
    random_arm: str = "random"
    reference_arm: str = "sac"
    baselines_from: str = ""
    # "X vs Y" comparisons whose probability of improvement the report gives.
    comparisons: tuple[tuple[str, str], ...] = ()
    # Whether its summaries belong in docs/results (committed); otherwise they stay under the runs folder.
    committed: bool = True
    # Where demonstrations come from (arms with demos=True): (benchmark, arm, seed, steps): the finished run of that
    # arm and seed on each game, whose policy `sobirl/demos.py record` plays for that many steps (whole games kept).
    demos: tuple[str, str, int, int] | None = None
    # Its seeds are seed_offset + 1 ... seed_offset + each arm's count (a pilot on seeds the benchmarks it informs
    # do not use, so that choosing by its results does not select on those benchmarks' own runs).
    seed_offset: int = 0
    # A pilot's rule, which its report applies (None: the benchmark chooses nothing).
    choice: Choice | None = None
    # The rule by which the benchmark's question is answered, which its report applies (None: none declared).
    success: Success | None = None

    def __post_init__(self):
        if self.success is not None:
            undeclared = set(self.success.comparisons()) - set(self.comparisons)
            if undeclared:
                raise ValueError(f"{self.name}: the success rule reads undeclared comparisons {sorted(undeclared)}")

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(arm.name for arm in self.arms)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise UsageError(f"benchmark {self.name} has no arm {name!r} (its arms: {', '.join(self.arm_names)})")

    def flag(self, arm: Arm, name: str) -> str | None:
        """The value of flag `name` in an arm's runs (the last one given wins, as on the command line); None if not
        set."""
        flags = (*self.common, *arm.flags)
        given = [k for k, flag in enumerate(flags[:-1]) if flag == name]
        return flags[given[-1] + 1] if given else None

    def labels(self, arm: Arm) -> int | None:
        """The --total-pairs an arm's runs get; None if not set."""
        labels = self.flag(arm, "--total-pairs")
        return None if labels is None else int(labels)


# The proving-ground settings: SAC as in the paper except a 100k replay and 5k random steps; the paper's preference
# schedule scaled to 100k steps: 5k SAC steps per outer iteration, 100 warm-up pairs x 100 epochs, 1,000 labels in
# 20 iterations, 25-step fragments, oracle teacher; every bilevel term on from 20k steps.
# A checkpoint every 25k steps (the replay included), so a machine that goes away mid-run costs at most a quarter run.
PROVING_GROUND = ("--buffer-size", "100000", "--learning-starts", "5000", "--save-every", "25000")


def preference_budget(labels: int, iterations: int = 20, initial: int = 0) -> tuple[str, ...]:
    """The preference flags of `labels` labels over `iterations` outer iterations of 5k SAC steps; the warm-up
    labels `initial` pairs (default a tenth of the labels) and trains on them for 100 epochs."""
    return (
        "--inner-steps", "5000", "--initial-pairs", str(initial or labels // 10), "--warmup-epochs", "100",
        "--total-pairs", str(labels), "--schedule-iterations", str(iterations), "--pair-buffer", str(labels),
    )  # fmt: skip


PREF = preference_budget(1000)
SMOKE_PREF = ("--inner-steps", "500", "--initial-pairs", "10", "--warmup-epochs", "2", "--total-pairs", "30",
              "--schedule-iterations", "3", "--pair-buffer", "30", "--fragment-length", "10")  # fmt: skip
RANDOM = Arm("random", "sac", ("--learning-starts", "100000000"), "Random policy", seeds=10)
SAC = Arm("sac", "sac", (), "SAC-discrete (true reward)", seeds=10)
DRLHF = Arm("drlhf", "drlhf", PREF, "DRLHF", seeds=10)
SOBIRL = Arm("sobirl", "sobirl", (*PREF, "--hyper-start", "20000"), "SoBiRL as specified", seeds=10)
SOBIRL_CORRECTED = Arm(
    "sobirl_corrected",
    "sobirl",
    (*PREF, "--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
    "SoBiRL, ratio-baseline correction",
    seeds=10,
)


def penalty_flags(sigma: str) -> tuple[str, ...]:
    """The penalty method (PBRL) at the main budget: each agent half the env steps, the value gap on from 20k."""
    return (*PREF, "--penalty-start", "20000", "--inner-split", "half", "--sigma", sigma)


def at_labels(source: Arm, labels: int) -> Arm:
    """`source`, an arm of the main budget (its flags begin with PREF), at `labels` labels: a point of its curve."""
    assert source.flags[: len(PREF)] == PREF, source.name
    flags = (*preference_budget(labels), *source.flags[len(PREF) :])
    return Arm(f"{source.name}_{labels}", source.algo, flags, f"{source.title}, {labels:,} labels", curve=source.name)


# Where DRLHF has room to improve (the bilevel term's fair test). Every rule below was written before any of these
# benchmarks' runs: the headroom pilot chooses each game's label budget; the beta pilot the pooled term's scale;
# `headroom` then runs every arm of `headroom_arms` at 10 seeds and is read by HEADROOM_SUCCESS.
HEADROOM_PILOT_RULE = (
    "each game keeps the largest of the budgets at which DRLHF's normalised IQM over its 3 runs is at most 0.8; a "
    "game with no such budget leaves the headroom benchmark, and this page says so"
)
BETA_PILOT_RULE = (
    "the pooled, capped implicit term (ratio-baseline correction, --implicit-cap 1) at beta 0.03, 0.1 and 0.3 on "
    "SpaceInvaders at the budget the headroom pilot chose for it, 3 seeds each (seeds 401-403): the beta with the "
    "highest normalised IQM of final return; on a tie (equal to two decimals), the smaller beta"
)
HEADROOM_CEILING = 0.8


def largest_budget_with_room(iqms: Sequence[tuple[str, float]]) -> str | None:
    """HEADROOM_PILOT_RULE, the arms given in increasing budget: the last one at or below the ceiling, if any."""
    with_room = [arm for arm, value in iqms if value <= HEADROOM_CEILING]
    return with_room[-1] if with_room else None


def highest_smaller_on_tie(iqms: Sequence[tuple[str, float]]) -> str:
    """BETA_PILOT_RULE, the arms given in increasing beta: the highest IQM to two decimals, the first of equals."""
    best = max(round(value, 2) for _, value in iqms)
    return next(arm for arm, value in iqms if round(value, 2) == best)


HEADROOM_SUCCESS = (
    "a bilevel arm helps if its probability of improvement over DRLHF has its 95% interval above 0.5 and, where it "
    "has a placebo, its probability of improvement over the placebo has too; the README names the arm, if any, with "
    "the Bonferroni-corrected interval beside it, and otherwise says none did and gives the diagnostics that explain "
    "it (split-half cosine, extra / BCE gradient ratio, off-policy share)"
)
CORRECTED = ("--hyper-start", "20000", "--implicit-correction", "ratio-baseline")
# The corrected, Fisher-curvature A-PARL (docs/algorithms.md §8.1): untruncated, positive semi-definite curvature.
PARL_FISHER = (
    "--parl-start", "20000", "--parl-curvature", "fisher", "--cg-damping-relative", "0.001", "--cg-iters", "30",
    "--curvature-states", "pairs", "--parl-reward-clamp", "--parl-max-ratio", "1",
    "--implicit-correction", "ratio-baseline",
)  # fmt: skip
# The penalty method with agent A at DRLHF's env steps and schedule (B's steps on top), sigma as the peers' pilot chose.
PENALTY_EQUAL_STEPS = ("--penalty-start", "20000", "--inner-split", "each", "--budget", "agent-a", "--sigma", "100")


def pooled(beta: str) -> tuple[str, ...]:
    """The pooled, capped implicit term at scale beta, with main's correction."""
    return (*CORRECTED, "--implicit-pooling", "--implicit-scale", beta, "--implicit-cap", "1")


# The headroom pilot's choice for SpaceInvaders (its page applies the rule to the committed summaries; a test checks
# that this is what it chose).
BETA_PILOT_LABELS = 250
BETAS = ("0.03", "0.1", "0.3")  # increasing: the rule's tie goes to the first
# The pilots' choices, which `headroom` runs (a test checks them against the committed pilots' pages): the headroom
# pilot kept SpaceInvaders at 250 labels (Breakout and Seaquest left: DRLHF's IQM above 0.8 at every budget); the beta
# pilot chose 0.3.
HEADROOM_BUDGETS = {"SpaceInvaders": BETA_PILOT_LABELS}
HEADROOM_BETA = "0.3"


def headroom_arms(labels: int, beta: str, seeds: int = 10) -> tuple[Arm, ...]:
    """The arms of `headroom` at a budget of `labels` and the beta the pilot chose."""
    budget = preference_budget(labels)
    return (
        Arm("drlhf", "drlhf", budget, "DRLHF", seeds=seeds),
        Arm("sobirl_corrected", "sobirl", (*budget, *CORRECTED), "SoBiRL, ratio-baseline correction", seeds=seeds),
        Arm(
            "sobirl_pooled", "sobirl", (*budget, *pooled(beta)), f"SoBiRL, pooled and capped, beta {beta}", seeds=seeds
        ),  # fmt: skip
        Arm("sobirl_placebo", "sobirl", (*budget, *pooled(beta), "--implicit-placebo"), "its placebo", seeds=seeds),
        Arm(
            "sobirl_latest",
            "sobirl",
            (*budget, *pooled(beta), "--implicit-pairs", "latest"),
            "pooled, on the latest phase's pairs",
            seeds=seeds,
        ),  # fmt: skip
        Arm("parl_fisher", "parl", (*budget, *PARL_FISHER), "A-PARL, corrected (Fisher curvature)", seeds=seeds),
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "main",
            "Every preference method against random play and SAC on the true reward, on three MinAtar games at "
            "equal env steps (100k) and label budget (1,000, of which a run uses 935: the query schedule's last two "
            "batches fall after its last step); the authors' pipeline (--reference-quirks) beside ours.",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(
                RANDOM,
                SAC,
                DRLHF,
                SOBIRL,
                SOBIRL_CORRECTED,
                Arm(
                    "sobirl_quirks",
                    "sobirl",
                    (*PREF, "--hyper-start", "20000", "--reference-quirks"),
                    "SoBiRL, the authors' pipeline",
                ),
                Arm("drlhf_quirks", "drlhf", (*PREF, "--reference-quirks"), "DRLHF, the authors' pipeline"),
                # The frozen-reward check: a fresh SAC on each run's final reward model.
                Arm("drlhf_frozen", "sac", (), "SAC on DRLHF's final reward", seeds=3, frozen_from="drlhf"),
                Arm("sobirl_frozen", "sac", (), "SAC on SoBiRL's final reward", seeds=3, frozen_from="sobirl"),
                Arm(
                    "sobirl_corrected_frozen",
                    "sac",
                    (),
                    "SAC on corrected SoBiRL's final reward",
                    seeds=3,
                    frozen_from="sobirl_corrected",
                ),
            ),
            comparisons=(
                ("sobirl", "drlhf"),
                ("sobirl_corrected", "drlhf"),
                ("sobirl_corrected", "sobirl"),
                ("sobirl_quirks", "drlhf_quirks"),
                ("drlhf", "sac"),
            ),
        ),
        Benchmark(
            "pilot",
            "Which third game for main: SAC on the true reward against random play on MinAtar Seaquest and Freeway "
            "at main's settings (100k env steps), 3 seeds each (seeds 201-203, which no other benchmark uses). The "
            "rule: a game qualifies when SAC's lowest final return is above random play's highest. Main's choice of "
            "Seaquest was made on 2026-12-02 from an earlier run of this pilot on seeds 1-3, whose summaries were not "
            "committed (final return per seed: Seaquest SAC 0.69, 0.63, 0.56, random 0.09, 0.09, 0.13; Freeway SAC "
            "0.25, 0.50, 0.50, random 0.25, 0.75, 0.25); these runs repeat it on fresh seeds, with their data kept.",
            games=("Seaquest", "Freeway"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(dataclasses.replace(RANDOM, seeds=3), dataclasses.replace(SAC, seeds=3)),
            random_arm="",
            reference_arm="",
            seed_offset=200,
        ),
        Benchmark(
            "sigma",
            "Pilot for the penalty method's sigma (one number on both sides, in units of the discounted return): three "
            "values a decade apart on MinAtar SpaceInvaders at the main benchmark's budget, 2 seeds each (seeds 101 "
            "and 102, which no other benchmark uses), to choose the sigma of the peers benchmark before its runs. "
            "The rule, fixed before the pilot ran: the highest mean final return over the two seeds; where the runs' "
            "ranges overlap, the highest mean Spearman correlation of learned and true return on fresh fragments.",
            games=("SpaceInvaders",),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(
                Arm(f"penalty_sigma{sigma}", "penalty", penalty_flags(sigma), f"penalty, sigma = {sigma}", seeds=2)
                for sigma in ("1", "10", "100")
            ),
            baselines_from="main",
            seed_offset=100,
        ),
        Benchmark(
            "peers",
            "The peer methods of the source papers on the main benchmark's games and budget: A-PARL with PARL's "
            "mixed term (eq. 17), AIHF with w1 = 0.01 fixed before the runs (demonstrations: 10k steps of each game's "
            "SAC seed-1 policy from main), the penalty method (PBRL, each agent half the steps) at sigma = 100, chosen "
            "by the sigma pilot's rule (sigma = 10 had the highest mean return, 6.60 against 6.31, but the two "
            "arms' ranges over their seeds overlapped, and sigma = 100's fresh-fragment Spearman was 0.71 against "
            "0.25), 5 seeds; random play, SAC and DRLHF come from main. Two of them ran otherwise than their papers "
            "intend: A-PARL uncorrected on the FIFO's mostly off-policy pairs, its Hessian damped by an absolute 0.1 "
            "and solved by 10 conjugate-gradient steps that stop at negative curvature, on replay states, with the "
            "mixed term on the unclamped reward and uncapped; the penalty method with each agent at half of DRLHF's "
            "env steps. `peers_fair` runs both corrected (docs/algorithms.md 8.1).",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(
                Arm("parl", "parl", (*PREF, "--parl-start", "20000"), "A-PARL (PARL's mixed term)"),
                Arm("aihf", "aihf", (*PREF, "--demo-weight", "0.01"), "AIHF, w1 = 0.01", demos=True),
                Arm("penalty", "penalty", penalty_flags("100"), "penalty, sigma = 100"),
            ),
            baselines_from="main",
            comparisons=(("parl", "drlhf"), ("aihf", "drlhf"), ("penalty", "drlhf")),
            demos=("main", "sac", 1, 10_000),
        ),
        Benchmark(
            "labels",
            "Label efficiency on MinAtar SpaceInvaders: DRLHF and the corrected SoBiRL at 250, 500 and 2,000 labels, "
            "5 seeds each, at the main benchmark's steps and schedule (the warm-up a tenth of the labels); the "
            "1,000-label points are main's runs. The SoBiRL variant is the one main puts first among its SoBiRL arms, "
            "the ratio-baseline correction: first at one seed per game when this benchmark was declared, and again "
            "in main's 5-seed aggregate.",
            games=("SpaceInvaders",),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(
                at_labels(source, labels) for source in (DRLHF, SOBIRL_CORRECTED) for labels in (250, 500, 2000)
            ),
            baselines_from="main",
        ),
        Benchmark(
            "headroom_pilot",
            "Where DRLHF has room to improve: DRLHF on main's three games at 50, 100 and 250 labels (main's steps and "
            "schedule, the warm-up a tenth of the labels), 3 seeds each (seeds 301-303, which no other benchmark "
            "uses); random play and SAC from main normalise. The rule, written before the runs: "
            + HEADROOM_PILOT_RULE
            + ". Then the beta pilot: "
            + BETA_PILOT_RULE
            + ". Then `headroom`, 10 seeds per arm and game at the chosen budgets: DRLHF, the corrected SoBiRL, the "
            "pooled term, its placebo, the pooled term on the latest phase's pairs and the corrected A-PARL; "
            + HEADROOM_SUCCESS
            + ".",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(dataclasses.replace(at_labels(DRLHF, labels), seeds=3) for labels in (50, 100, 250)),
            baselines_from="main",
            seed_offset=300,
            choice=Choice(HEADROOM_PILOT_RULE, largest_budget_with_room),
        ),
        Benchmark(
            "beta_pilot",
            f"The scale beta of the pooled, capped implicit term for `headroom`, on MinAtar SpaceInvaders at "
            f"{BETA_PILOT_LABELS} labels (the budget the headroom pilot chose for it), main's steps and schedule "
            "otherwise, 3 seeds each (seeds 401-403, which no other benchmark uses); random play and SAC from main "
            "normalise. The rule, written before the runs: " + BETA_PILOT_RULE + ".",
            games=("SpaceInvaders",),
            steps=100_000,
            common=PROVING_GROUND,
            arms=tuple(
                Arm(
                    f"pooled_beta{beta}",
                    "sobirl",
                    (*preference_budget(BETA_PILOT_LABELS), *pooled(beta)),
                    f"pooled, capped term, beta {beta}",
                    seeds=3,
                )
                for beta in BETAS
            ),
            baselines_from="main",
            seed_offset=400,
            choice=Choice(BETA_PILOT_RULE, highest_smaller_on_tie),
        ),
        Benchmark(
            "headroom",
            "Where DRLHF has room to improve, does any form of the bilevel term beat it and its own placebo? The "
            "games and budgets the headroom pilot kept (SpaceInvaders at 250 labels; Breakout and Seaquest left it, "
            "DRLHF's IQM above 0.8 at every budget) and the beta the beta pilot chose (0.3), main's steps and "
            "schedule otherwise, 10 seeds per arm (seeds 1-10): DRLHF, the corrected SoBiRL, the pooled, capped "
            "term, its placebo, the pooled term on the latest phase's pairs and the corrected A-PARL; random play and "
            "SAC from main normalise. The success rule, written before the runs: " + HEADROOM_SUCCESS + ".",
            games=tuple(HEADROOM_BUDGETS),
            steps=100_000,
            common=PROVING_GROUND,
            arms=headroom_arms(HEADROOM_BUDGETS["SpaceInvaders"], HEADROOM_BETA),
            baselines_from="main",
            comparisons=(
                ("sobirl_corrected", "drlhf"),
                ("sobirl_pooled", "drlhf"),
                ("sobirl_latest", "drlhf"),
                ("parl_fisher", "drlhf"),
                ("sobirl_pooled", "sobirl_placebo"),
                ("sobirl_placebo", "drlhf"),
            ),
            success=Success(
                HEADROOM_SUCCESS,
                "drlhf",
                (
                    ("sobirl_corrected", ""),
                    ("sobirl_pooled", "sobirl_placebo"),
                    ("sobirl_latest", ""),
                    ("parl_fisher", ""),
                ),
            ),
        ),
        Benchmark(
            "peers_fair",
            "The peers run fairly, at main's games and budget (1,000 labels), 5 seeds: the "
            "corrected, Fisher-curvature A-PARL (untruncated, positive semi-definite curvature, damping relative to "
            "alpha, curvature on the pairs' own states, the mixed term through the clamp SAC sees, off-policy "
            "corrected, and its implicit part capped at the cross-entropy gradient's norm, which PARL does not do; "
            "docs/algorithms.md 8.1) and the penalty method with agent A at DRLHF's env steps and schedule "
            "(agent B's steps on top; sigma = 100 as for peers). The peers page stays, labelled with what it ran; "
            "random play, SAC and DRLHF come from main.",
            games=("SpaceInvaders", "Breakout", "Seaquest"),
            steps=100_000,
            common=PROVING_GROUND,
            arms=(
                Arm("parl_fisher", "parl", (*PREF, *PARL_FISHER), "A-PARL, corrected (Fisher curvature)"),
                Arm("penalty_equal", "penalty", (*PREF, *PENALTY_EQUAL_STEPS), "penalty, agent A at DRLHF's steps"),
            ),
            baselines_from="main",
            comparisons=(("parl_fisher", "drlhf"), ("penalty_equal", "drlhf")),
        ),
        Benchmark(
            "envs4",
            "Is learning unchanged by the GPU path's design? DRLHF and the corrected SoBiRL on MinAtar SpaceInvaders "
            "at main's settings with 4 envs and --graph-ready (one update of batch 64 per 4 env steps, as with one "
            "env; sampling without host syncs), seeds 1-5, each compared with main's 1-env runs of the same arm on "
            "the same seeds. The reading, written before the runs: learning is taken as unchanged where the "
            "probability of improvement's 95% interval contains 0.5. DRLHF's 4-env runs were ahead of its 1-env "
            "runs; the third arm, added on 2026-12-07 after those runs, tells the two parts of the change apart: "
            "DRLHF with 4 envs on the default path (host-side sampling, torch.multinomial and torch.randint), read "
            "against the 1-env runs (the 4 envs) and against the graph-ready 4-env runs (the path) by the same rule.",
            games=("SpaceInvaders",),
            steps=100_000,
            common=(*PROVING_GROUND, "--num-envs", "4", "--graph-ready"),
            arms=(
                Arm("drlhf_4envs", "drlhf", PREF, "DRLHF, 4 envs, graph-ready"),
                Arm("sobirl_corrected_4envs", "sobirl", (*PREF, *CORRECTED), "corrected SoBiRL, 4 envs, graph-ready"),
                Arm("drlhf_4envs_default", "drlhf", (*PREF, "--no-graph-ready"), "DRLHF, 4 envs, default path"),
            ),
            baselines_from="main",
            comparisons=(
                ("drlhf_4envs", "drlhf"),
                ("sobirl_corrected_4envs", "sobirl_corrected"),
                ("drlhf_4envs_default", "drlhf"),
                ("drlhf_4envs", "drlhf_4envs_default"),
            ),
        ),
        Benchmark(
            "robustness",
            "DRLHF and the corrected SoBiRL under B-Pref's imperfect teachers and with uncertainty-based query "
            "selection, on MinAtar Breakout at half the main budget (50k steps, 500 labels).",
            games=("Breakout",),
            steps=50_000,
            common=("--buffer-size", "50000", "--learning-starts", "5000", *preference_budget(500, 10, initial=100)),
            arms=tuple(
                Arm(
                    f"{method}_{teacher}_{selection}",
                    algo,
                    (*method_flags, *teacher_flags, *selection_flags),
                    f"{title}, {teacher}, {selection}",
                    seeds=3,
                )
                for method, algo, method_flags, title in (
                    ("drlhf", "drlhf", (), "DRLHF"),
                    (
                        "sobirl_corrected",
                        "sobirl",
                        ("--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
                        "SoBiRL corrected",
                    ),
                )
                for teacher, teacher_flags in (
                    ("oracle", ("--teacher", "oracle")),
                    *((t, ("--teacher", "bpref", "--bpref-preset", t)) for t in ("mistake", "noisy", "skip", "myopic")),
                )
                for selection, selection_flags in (
                    ("uniform", ()),
                    ("ensemble-uniform", ("--ensemble", "3")),
                    ("disagreement", ("--ensemble", "3", "--query-selection", "disagreement")),
                )
                if selection == "uniform" or teacher in ("oracle", "mistake")
            ),
            random_arm="",
            reference_arm="",
        ),
        Benchmark(
            "quickstart",
            "DRLHF, SoBiRL as specified and SoBiRL with the ratio-baseline correction on MinAtar Breakout: 50k env "
            "steps and a 500-label budget each, one seed (a first look, not evidence).",
            games=("Breakout",),
            steps=50_000,
            common=("--buffer-size", "50000", "--learning-starts", "5000", *preference_budget(500, 10)),
            arms=(
                Arm("drlhf", "drlhf", (), "DRLHF", seeds=1),
                Arm("sobirl", "sobirl", ("--hyper-start", "20000"), "SoBiRL as specified", seeds=1),
                Arm(
                    "sobirl_corrected",
                    "sobirl",
                    ("--hyper-start", "20000", "--implicit-correction", "ratio-baseline"),
                    "SoBiRL, ratio-baseline correction",
                    seeds=1,
                ),
            ),
            random_arm="",
            reference_arm="",
            committed=False,
        ),
        Benchmark(
            "smoke",
            "A one-minute check of the harness itself (tiny budgets; its numbers mean nothing).",
            games=("Breakout",),
            steps=2_000,
            common=("--buffer-size", "2000", "--learning-starts", "500", "--batch-size", "16", "--save-every", "500"),
            arms=(
                Arm("random", "sac", ("--learning-starts", "100000000"), seeds=2),
                Arm("sac", "sac", (), seeds=2),
                Arm("drlhf", "drlhf", SMOKE_PREF, seeds=2),
                Arm("drlhf_frozen", "sac", (), seeds=1, frozen_from="drlhf"),
                Arm("aihf", "aihf", (*SMOKE_PREF, "--demo-batch", "8"), seeds=1, demos=True),
            ),
            comparisons=(("drlhf", "sac"),),
            demos=("smoke", "sac", 1, 1000),
            committed=False,
        ),
    )
}


def env_id(game: str) -> str:
    return f"MinAtar/{game}-v1"
