#!/usr/bin/env bash
# The MinAtar benchmark of the README: three games, 100k env steps per run, 3 seeds per method, two single-thread
# jobs at a time (the sweep script lists the jobs; xargs keeps two running). Runs land in $RUNS (default runs/);
# `python sobirl/plot.py --runs-dir $RUNS --env-id MinAtar-<Game>-v1` draws each game's figure and table.
#   bash docs/minatar_benchmark.sh baselines    # random policy and SAC-discrete on the true reward
#   bash docs/minatar_benchmark.sh preference   # DRLHF, SoBiRL as specified, SoBiRL corrected
set -euo pipefail
STAGE=${1:-all}
RUNS=${RUNS:-runs}
GAMES=${GAMES:-"SpaceInvaders Breakout Freeway"}
SEEDS=${SEEDS:-3}
mkdir -p "$RUNS/sweep_logs"
export OMP_NUM_THREADS=1  # one thread per job: MinAtar's networks are too small to split
jobs() {  # the command lines of one sweep, without running them
  python sobirl/sweep.py --num-seeds "$SEEDS" --workers 2 --dry-run "$@" | grep -v '^#'
}
{
  for GAME in $GAMES; do
    COMMON=(--env-id "MinAtar/$GAME-v1" --total-timesteps 100000 --buffer-size 100000 --learning-starts 5000
            --no-progress --runs-dir "$RUNS")
    # The paper's schedule scaled to the budget: 5k SAC steps per outer iteration (19 iterations), 100 warm-up
    # pairs and 100 warm-up epochs, 1,000 pairs in all, implicit term from 20k steps.
    PREF=(--inner-steps 5000 --initial-pairs 100 --warmup-epochs 100 --total-pairs 1000 --schedule-iterations 20
          --pair-buffer 1000)
    if [[ $STAGE == all || $STAGE == baselines ]]; then
      # Uniform random actions throughout: learning never starts.
      jobs --algos sac -- "${COMMON[@]}" --learning-starts 100000000 --exp-name random
      jobs --algos sac -- "${COMMON[@]}"
    fi
    if [[ $STAGE == all || $STAGE == preference ]]; then
      jobs --algos drlhf -- "${COMMON[@]}" "${PREF[@]}"
      jobs --algos sobirl -- "${COMMON[@]}" "${PREF[@]}" --hyper-start 20000
      jobs --algos sobirl -- "${COMMON[@]}" "${PREF[@]}" --hyper-start 20000 --implicit-correction ratio-baseline \
        --exp-name sobirl_corrected
    fi
  done
} | awk '{for (i = 1; i < NF; i++) if ($i == "--seed") print $(i + 1), $0}' | sort -s -n -k1,1 | cut -d' ' -f2- |
  nl -w1 -s' ' |  # seed 1 of every game and method first, so a benchmark stopped early still compares them all
  xargs -P 2 -L 1 bash -c 'job=$0; echo "job $job: $*"; env "$@" > "'"$RUNS"'/sweep_logs/job$job.log" 2>&1; echo "job $job exit $?"'
