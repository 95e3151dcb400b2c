"""The paper's BeamRider experiment (Figure 1 of SoBiRL): one entry point for every algorithm.

    python sobirl/beamrider.py                 # SoBiRL (the default)
    python sobirl/beamrider.py --algo drlhf    # DRLHF: the same pipeline, Bradley-Terry loss only
    python sobirl/beamrider.py --algo sac      # SAC-discrete on the true (clipped) game reward
    python sobirl/beamrider.py --algo parl     # PARL: implicit-function hyper-gradient (CG on actor Hessians)
    python sobirl/beamrider.py --algo penalty  # penalty methods (PBRL / Gaur et al.): two SAC agents
    python sobirl/beamrider.py --resume runs/<run>   # continue any run: its algorithm and flags come from it

Every other flag goes to the algorithm; `python sobirl/beamrider.py --algo sac --help` lists them with defaults.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from agents.infra.cli import OneLineErrorParser, require, run_cli

ALGORITHMS = {
    "sobirl": "agents.sobirl",
    "drlhf": "agents.drlhf",
    "sac": "agents.sac_discrete",
    "aihf": "agents.aihf",
    "parl": "agents.parl",
    "penalty": "agents.penalty",
}
DEFAULT_ALGO = "sobirl"


def checkpoint_algo(resume: str) -> str:
    from agents.infra.checkpoint_header import load_checkpoint_metadata

    return load_checkpoint_metadata(resume)["algo"]


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineErrorParser(
        description=__doc__, add_help=False, usage=f"%(prog)s [--algo {{{','.join(ALGORITHMS)}}}] [algorithm flags]"
    )
    parser.add_argument("--algo", default=None, choices=list(ALGORITHMS), help="which algorithm to run")
    known, rest = parser.parse_known_args(argv)
    resume = OneLineErrorParser(add_help=False)
    resume.add_argument("--resume", default="")
    resume_path = resume.parse_known_args(rest)[0].resume
    algo = known.algo
    if resume_path:
        saved = checkpoint_algo(resume_path)
        require(algo in (None, saved), f"--algo {algo}: the checkpoint in --resume {resume_path} is a {saved!r} run")
        algo = saved
    algo = algo or DEFAULT_ALGO
    require(algo in ALGORITHMS, f"--algo: the checkpoint's algorithm {algo!r} is not one of {', '.join(ALGORITHMS)}")
    if "-h" in rest or "--help" in rest:
        print(f"--algo {{{','.join(ALGORITHMS)}}}: the algorithm to run (default {DEFAULT_ALGO}); {algo}'s flags:\n")
    return importlib.import_module(ALGORITHMS[algo]).main(rest)


if __name__ == "__main__":
    run_cli(main)
