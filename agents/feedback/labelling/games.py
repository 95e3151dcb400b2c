"""What the page tells a person about the game: a one-line goal (what "better" means) and, for MinAtar, which
colour is which object."""

from __future__ import annotations

import re

from agents.feedback.labelling.render import MINATAR_PALETTE

# MinAtar's five games: the goal, and the objects of the board's channels in channel order (the minatar package's
# `Environment(game).env.channels`), drawn in MINATAR_PALETTE's colours in that order.
MINATAR_GAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Asterix": (
        "Collect the gold and dodge the enemies: touching an enemy ends the game.",
        ("you (player)", "enemy", "trail (direction of motion)", "gold (treasure)"),
    ),
    "Breakout": (
        "Break bricks by bouncing the ball off the paddle; letting the ball past the paddle ends the game.",
        ("paddle (you)", "ball", "trail (ball's last position)", "brick"),
    ),
    "Freeway": (
        "Get the chicken across the road to the top as many times as possible; a car hit sends it back down.",
        (
            "chicken (you)",
            "car",
            "car's trail: fastest car",
            "car's trail: speed 2 of 5",
            "car's trail: speed 3 of 5",
            "car's trail: speed 4 of 5",
            "car's trail: slowest car",
        ),
    ),
    "Seaquest": (
        "Shoot enemy fish and subs, pick up divers, and surface with divers before the oxygen runs out.",
        (
            "your sub (front)",
            "your sub (back)",
            "your bullet",
            "trail (direction of motion)",
            "enemy bullet",
            "enemy fish",
            "enemy sub",
            "oxygen gauge",
            "diver gauge (divers aboard)",
            "diver",
        ),
    ),
    "SpaceInvaders": (
        "Shoot the aliens before they reach the bottom, and dodge their bullets.",
        ("cannon (you)", "alien", "alien moving left", "alien moving right", "your bullet", "enemy bullet"),
    ),
}

# Atari games, by ALE name. A game not listed gets ATARI_DEFAULT_GOAL.
ATARI_GOALS: dict[str, str] = {
    "Alien": "Collect the eggs along the corridors while escaping the aliens.",
    "Asterix": "Collect the objects and avoid the lyres; losing all lives ends the game.",
    "BeamRider": "Destroy the white enemy saucers of each sector while dodging debris and enemy shots.",
    "Boxing": "Land more punches on the opponent than it lands on you.",
    "Breakout": "Break bricks by bouncing the ball off the paddle; do not let the ball past it.",
    "Enduro": "Pass as many cars as possible each day of the race without crashing.",
    "Freeway": "Get the chicken across the road as many times as possible, dodging the cars.",
    "MsPacman": "Eat the dots and avoid the ghosts (eat them only after a power pill).",
    "Pong": "Hit the ball past the opponent: you play the right (green) paddle.",
    "Qbert": "Hop on every cube to change its colour, avoiding the enemies and the edge.",
    "Seaquest": "Shoot enemies, rescue divers, and surface before the oxygen runs out.",
    "SpaceInvaders": "Shoot the aliens and dodge their bullets; the bottom cannon is yours.",
}
ATARI_DEFAULT_GOAL = "Score as many points as you can and lose as few lives as possible."

_MINATAR_ID = re.compile(r"^MinAtar/(?P<game>[A-Za-z]+)-v\d+$")
_ATARI_IDS = (re.compile(r"^ALE/(?P<game>[A-Za-z]+)-v\d+$"), re.compile(r"^(?P<game>[A-Za-z]+?)(NoFrameskip)?-v\d+$"))


def colour_hex(rgb) -> str:
    return "#" + "".join(f"{int(value):02x}" for value in rgb)


def game_guide(env_id: str) -> dict:
    """{"game", "goal", "legend": [{"name", "colour"}]} for the page; an unknown or empty id gets a generic goal
    and no legend."""
    match = _MINATAR_ID.match(env_id or "")
    if match and match["game"] in MINATAR_GAMES:
        goal, channels = MINATAR_GAMES[match["game"]]
        legend = [{"name": name, "colour": colour_hex(MINATAR_PALETTE[c])} for c, name in enumerate(channels)]
        return {"game": f"MinAtar {match['game']}", "goal": goal, "legend": legend}
    for pattern in _ATARI_IDS:
        match = pattern.match(env_id or "")
        if match:
            game = match["game"]
            return {"game": game, "goal": ATARI_GOALS.get(game, ATARI_DEFAULT_GOAL), "legend": []}
    return {"game": env_id or "", "goal": ATARI_DEFAULT_GOAL, "legend": []}
