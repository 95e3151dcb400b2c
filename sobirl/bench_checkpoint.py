"""Bytes and seconds a checkpoint spends on the replay, with and without chunk reuse (a measurement, not a test).

    python sobirl/bench_checkpoint.py                       # 100,000-slot Atari replay, a save every 10,000 steps
    python sobirl/bench_checkpoint.py --steps 300000 --buffer-size 200000 --save-every 25000 --json
    python sobirl/bench_checkpoint.py --pairs-per-save 69   # and the pair buffer, 69 BeamRider pairs per save

Fills a FrameReplayBuffer with Atari-shaped steps (random 84x84 frames, frame stack 4; no emulator, no network)
and saves its state with `save_atomic` every --save-every steps, into a scratch run directory, twice: with the
chunk files of agents/infra/checkpoint.py reused across checkpoints (today's format), and with every chunk written
at every save (a chunk as large as the replay: what each checkpoint wrote before the replay was chunked). Prints,
for both, the bytes written per checkpoint (mean and last, from the file sizes the saves wrote) and the seconds per
save. --buffer-size smaller than --steps shows the ring after it wraps. With --pairs-per-save, each checkpoint also
holds a PairBuffer of --pair-buffer pairs of 25-step Atari fragments (random frames), that many more before each
save (69: the 4.3M-step run's 2,947 pairs over its 43 saves), chunked or whole like the replay.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import agents.infra.checkpoint as checkpoint
from agents.feedback.pairs import PairBatch, PairBuffer
from agents.infra.cli import flag, parse_args, require_non_negative, require_positive, run_cli
from agents.lower.replay import FrameReplayBuffer
from sobirl.bench import print_results

OBS_SHAPE = (4, 84, 84)
FRAGMENT = 25  # steps per fragment (the paper's)


@dataclass
class CheckpointBenchArgs:
    json: bool = flag(False, "print one JSON object instead of text")
    steps: int = flag(100_000, "agent steps stored (one env)")
    buffer_size: int = flag(100_000, "replay capacity in transitions")
    save_every: int = flag(10_000, "steps between checkpoints")
    directory: str = flag("", "scratch folder for the checkpoints (default: a temporary folder, removed after)")
    pairs_per_save: int = flag(0, "labelled pairs added before each save (0: the checkpoints hold the replay only)")
    pair_buffer: int = flag(9_000, "pair buffer capacity (the paper's label budget)")


def random_pairs(count: int, rng: np.random.Generator) -> PairBatch:
    """`count` pairs of Atari fragments with random frames (their content does not matter here)."""
    frames = torch.from_numpy(rng.integers(0, 256, size=(count, FRAGMENT + OBS_SHAPE[0] - 1, *OBS_SHAPE[1:]),
                                           dtype=np.uint8))  # fmt: skip
    actions = torch.zeros((count, FRAGMENT), dtype=torch.int64)
    labels = torch.full((count,), 0.5)
    return PairBatch(frames, actions, frames.clone(), actions.clone(), labels, labels.clone(), labels.clone())


def run_saves(args: CheckpointBenchArgs, chunk_bytes: int, directory: Path) -> dict:
    """Store --steps steps, saving every --save-every; bytes written and seconds per save."""
    buffer = FrameReplayBuffer(args.buffer_size, 1, OBS_SHAPE, 4, "cpu")
    buffer.CHUNK_BYTES = chunk_bytes
    pairs = PairBuffer(args.pair_buffer, FRAGMENT, OBS_SHAPE[1:], OBS_SHAPE[0], "cpu")
    pairs.CHUNK_BYTES = chunk_bytes
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(256, 1, *OBS_SHAPE), dtype=np.uint8)  # reused: content does not matter
    new_pairs = random_pairs(args.pairs_per_save, rng)
    written, seconds = [], []
    real_write_chunk = checkpoint._write_chunk
    counted: list[int] = []

    def counting(path, namespace, index, tensors):
        entry = real_write_chunk(path, namespace, index, tensors)
        counted.append(entry["bytes"])
        return entry

    checkpoint._write_chunk = counting
    try:
        path = directory / checkpoint.CHECKPOINT_NAME
        for step in range(1, args.steps + 1):
            buffer.add(frames[step % 256], [step % 9], [0.0], [step % 97 == 0], [False], [1.0 / 9])
            if step % args.save_every == 0:
                state = {"replay": buffer.state_dict(step)}
                if args.pairs_per_save:
                    pairs.add(new_pairs)
                    state["pairs"] = pairs.state_dict()
                counted.clear()
                start = time.perf_counter()
                checkpoint.save_atomic(state, path)
                seconds.append(time.perf_counter() - start)
                written.append(sum(counted) + path.stat().st_size)
    finally:
        checkpoint._write_chunk = real_write_chunk
    return {
        "saves": len(written),
        "bytes_per_save_mean": int(np.mean(written)),
        "bytes_per_save_last": written[-1],
        "seconds_per_save_mean": round(float(np.mean(seconds)), 3),
        # The whole-file layout's chunk is "as large as the replay": its nominal row count (2**62 bytes' worth) says
        # nothing, so the replay's capacity is reported instead.
        "chunk_rows": min(buffer._saved_chunks.chunk_rows, args.buffer_size) if buffer._saved_chunks else None,
    }


def measure(args: CheckpointBenchArgs) -> dict:
    results: dict = {
        "steps": args.steps,
        "buffer_size": args.buffer_size,
        "save_every": args.save_every,
        "pairs_per_save": args.pairs_per_save,
        "pair_buffer": args.pair_buffer,
    }
    with tempfile.TemporaryDirectory(dir=args.directory or None) as scratch:
        for name, chunk_bytes in (("chunked", FrameReplayBuffer.CHUNK_BYTES), ("whole", 1 << 62)):
            folder = Path(scratch) / name
            folder.mkdir()
            for key, value in run_saves(args, chunk_bytes, folder).items():
                results[f"{name}_{key}"] = value
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(CheckpointBenchArgs, argv, __doc__)
    require_positive(args, "steps", "buffer_size", "save_every", "pair_buffer")
    require_non_negative(args, "pairs_per_save")
    torch.set_num_threads(1)
    results = measure(args)
    print_results(results, args.json)
    return results


if __name__ == "__main__":
    run_cli(main)
