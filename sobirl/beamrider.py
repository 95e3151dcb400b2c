"""The paper's BeamRider experiment (Figure 1 of SoBiRL): one entry point for all three curves.

    python sobirl/beamrider.py                 # SoBiRL (the default)
    python sobirl/beamrider.py --algo drlhf    # DRLHF: the same pipeline, Bradley-Terry loss only
    python sobirl/beamrider.py --algo sac      # SAC-discrete on the true (clipped) game reward

Every other flag goes to the algorithm; `python sobirl/beamrider.py --algo sac --help` lists them with defaults.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from agents.common import OneLineErrorParser, run_cli

ALGORITHMS = {"sobirl": "agents.sobirl", "drlhf": "agents.drlhf", "sac": "agents.sac_discrete"}
ENV_ID = "BeamRiderNoFrameskip-v4"


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineErrorParser(description=__doc__, add_help=False, usage="%(prog)s [--algo {sobirl,drlhf,sac}] [algorithm flags]")
    parser.add_argument("--algo", default="sobirl", choices=sorted(ALGORITHMS), help="which algorithm to run")
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(f"--algo {{{','.join(sorted(ALGORITHMS))}}}: the algorithm to run (default sobirl); {known.algo}'s flags:\n")
    if not any(arg == "--env-id" or arg.startswith("--env-id=") for arg in rest):
        rest = ["--env-id", ENV_ID, *rest]
    module = importlib.import_module(ALGORITHMS[known.algo])
    return module.main(rest)


if __name__ == "__main__":
    run_cli(main)
