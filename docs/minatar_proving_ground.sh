#!/usr/bin/env bash
# The CPU proving ground of the README: MinAtar SpaceInvaders, 100k env steps, 3 seeds per method, 2 workers
# (one core each). Runs land in runs/; `python sobirl/plot.py --env-id MinAtar-SpaceInvaders-v1` draws the figure.
set -euo pipefail
COMMON=(--env-id MinAtar/SpaceInvaders-v1 --total-timesteps 100000 --buffer-size 100000 --learning-starts 5000 --no-progress)
# The paper's schedule scaled to the budget: 5k SAC steps per outer iteration (19 iterations), 100 warm-up pairs
# and 100 warm-up epochs, 1,000 pairs in all, implicit term from 20k steps.
PREF=(--inner-steps 5000 --initial-pairs 100 --warmup-epochs 100 --total-pairs 1000 --schedule-iterations 20
      --pair-buffer 1000)
python sobirl/sweep.py --algos sac --num-seeds 3 --workers 2 -- "${COMMON[@]}"
python sobirl/sweep.py --algos drlhf --num-seeds 3 --workers 2 -- "${COMMON[@]}" "${PREF[@]}"
python sobirl/sweep.py --algos sobirl --num-seeds 3 --workers 2 -- "${COMMON[@]}" "${PREF[@]}" --hyper-start 20000
python sobirl/sweep.py --algos sobirl --num-seeds 3 --workers 2 -- "${COMMON[@]}" "${PREF[@]}" --hyper-start 20000 \
    --hyper-baseline --exp-name sobirl_baseline
# Uniform random actions throughout: learning never starts.
python sobirl/sweep.py --algos sac --num-seeds 3 --workers 2 -- "${COMMON[@]}" --learning-starts 100000000 \
    --exp-name random
