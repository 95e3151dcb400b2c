"""Checkpoints: round trip, kill and resume, Ctrl-C, corrupt files, and CPU reproducibility over 1,000 updates."""

import signal
import subprocess
import sys
import time

import torch

from agents.infra.checkpoint import load_checkpoint, save_atomic
from agents.infra.cli import UsageError
from agents.lower.sac import Args, SACTrainer
from tests.conftest import REPO, assert_usage_error, only_run_dir, run_script, scalar_tags

TINY = [
    "--learning-starts",
    "200",
    "--buffer-size",
    "1000",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--max-episode-frames",
    "400",
    "--no-progress",
]


def tiny_trainer(**overrides) -> SACTrainer:
    args = Args(learning_starts=50, buffer_size=500, batch_size=8, max_episode_frames=400, progress=False, cuda=False)
    for key, value in overrides.items():
        setattr(args, key, value)
    return SACTrainer(args, torch.device("cpu"))


def test_round_trip_restores_networks_optimizers_and_replay(tmp_path):
    torch.manual_seed(0)
    trainer = tiny_trainer()
    trainer.collect(120)
    save_atomic(trainer.state_dict(), tmp_path / "checkpoint.pt")
    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    restored = tiny_trainer()
    restored.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    obs = torch.as_tensor(trainer.obs)
    for name in ("actor", "qf1", "qf2", "qf1_target", "qf2_target"):
        torch.testing.assert_close(
            getattr(restored.agent, name)(obs), getattr(trainer.agent, name)(obs), rtol=0, atol=0
        )
    saved_opt, restored_opt = trainer.agent.q_optimizer.state_dict(), restored.agent.q_optimizer.state_dict()
    for key, value in saved_opt["state"].items():
        torch.testing.assert_close(restored_opt["state"][key]["exp_avg"], value["exp_avg"], rtol=0, atol=0)
    assert restored.alpha == trainer.alpha and restored.global_step == trainer.global_step == 120
    written = trainer.buffer.written  # slots past it were never written (the storage is allocated untouched)
    assert restored.buffer.written == written
    assert torch.equal(restored.buffer.frames[:written], trainer.buffer.frames[:written])
    # The environments restart, so the last stored step must not be joined to the next game's first frame.
    last = (restored.buffer.pos - 1) % restored.buffer.slots
    assert not restored.buffer.real[last].any()
    trainer.close()
    restored.close()


def test_truncated_checkpoint_is_refused_with_one_line(tmp_path):
    trainer = tiny_trainer()
    save_atomic(trainer.state_dict(), tmp_path / "checkpoint.pt")
    trainer.close()
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    try:
        load_checkpoint(tmp_path / "checkpoint.pt")
        raise AssertionError("a truncated checkpoint was accepted")
    except UsageError as err:
        assert "--resume" in str(err)
    assert_usage_error(run_script("agents/sac_discrete.py", "--resume", str(tmp_path)), "--resume")
    assert_usage_error(run_script("agents/sac_discrete.py", "--resume", str(tmp_path / "missing")), "--resume")


def start(runs_dir, *flags):
    return subprocess.Popen(
        [sys.executable, "agents/sac_discrete.py", "--runs-dir", str(runs_dir), *TINY, *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(runs_dir, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(runs_dir.glob("*/checkpoint.pt"))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_reaches_the_same_step_with_a_continuous_log(tmp_path):
    runs = tmp_path / "runs"
    process = start(runs, "--total-timesteps", "800", "--save-every", "100")
    checkpoint = wait_for_checkpoint(runs, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(checkpoint)["global_step"]
    assert killed_at < 800
    result = run_script("agents/sac_discrete.py", "--resume", str(checkpoint.parent), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(checkpoint)["global_step"] == 800
    run_dir = only_run_dir(runs)
    steps = [step for step, _ in scalar_tags(run_dir)["losses/qf1_loss"]]
    # One update per 4 env steps from step 204 on, each logged exactly once across the two processes.
    assert steps == list(range(204, 801, 4))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    runs = tmp_path / "runs"
    process = start(runs, "--total-timesteps", "100000000")
    deadline = time.time() + 120
    while not list(runs.glob("*/events.*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    state = load_checkpoint(only_run_dir(runs))
    assert state["global_step"] > 0


def test_same_seed_and_command_give_the_same_losses_for_1000_updates(tmp_path):
    # One update per env step and small batches keep 1,000 updates cheap; the code path is the paper's.
    flags = [
        "--total-timesteps",
        "1100",
        "--learning-starts",
        "100",
        "--update-frequency",
        "1",
        "--buffer-size",
        "2000",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--max-episode-frames",
        "2000",
        "--no-progress",
    ]
    runs = []
    for name in ("a", "b"):
        result = run_script("agents/sac_discrete.py", *flags, "--runs-dir", str(tmp_path / name), timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(scalar_tags(only_run_dir(tmp_path / name)))
    for tag in ("losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss", "losses/alpha_loss"):
        assert len(runs[0][tag]) == 1000
        assert runs[0][tag] == runs[1][tag], tag


# ---------------------------------------------------------------------------------------------------------------
# The replay in chunk files: a checkpoint writes only the chunks whose slots changed since the last one


REPLAY_FIELDS = ("frames", "actions", "rewards", "behaviour", "terminated", "first", "real", "sampleable")


def chunked_trainer(monkeypatch, chunk_slots: int = 20, **overrides) -> SACTrainer:
    """An Atari trainer (frame stack 4) whose replay of 500 slots is checkpointed in chunks of `chunk_slots`."""
    from agents.lower.replay import FrameReplayBuffer

    torch.manual_seed(0)
    trainer = tiny_trainer(**overrides)
    row_bytes = sum(getattr(trainer.buffer, name)[:1].nbytes for name in REPLAY_FIELDS)
    monkeypatch.setattr(FrameReplayBuffer, "CHUNK_BYTES", chunk_slots * row_bytes)
    return trainer


def count_chunk_writes(monkeypatch) -> list[tuple[int, int]]:
    """(chunk index, bytes) of every chunk file written from now on."""
    import agents.infra.checkpoint as checkpoint

    writes, real_write = [], checkpoint._write_chunk

    def counting(path, namespace, index, tensors):
        entry = real_write(path, namespace, index, tensors)
        writes.append((index, entry["bytes"]))
        return entry

    monkeypatch.setattr(checkpoint, "_write_chunk", counting)
    return writes


def assert_same_replay(restored, live) -> None:
    assert (restored.pos, restored.written) == (live.pos, live.written)
    for name in REPLAY_FIELDS:
        assert torch.equal(getattr(restored, name)[: live.written], getattr(live, name)[: live.written]), name
    assert torch.equal(restored._next_first, live._next_first)


def loaded_replay(path, like):
    from agents.lower.replay import FrameReplayBuffer

    buffer = FrameReplayBuffer(like.slots * like.num_envs, like.num_envs, like.obs_shape, like.stack, "cpu")
    buffer.load_state_dict(load_checkpoint(path)["replay"])
    return buffer


def test_a_second_checkpoint_writes_only_the_chunks_of_the_slots_written_since_the_first(tmp_path, monkeypatch):
    """Chunks of 20 slots, frame stack 4: a save writes the chunks of slots pos_before - 4 .. pos_now + 3 and
    references the rest, also once the ring has wrapped; files no checkpoint references are deleted.
    Broken on purpose once: `_SavedChunks.unchanged` returning {} (every chunk rewritten) fails the first count."""
    trainer = chunked_trainer(monkeypatch, learning_starts=100_000)  # no updates: only the replay matters here
    writes = count_chunk_writes(monkeypatch)
    path = tmp_path / "checkpoint.pt"

    def save_and_count(steps: int) -> set[int]:
        trainer.collect(steps)
        writes.clear()
        save_atomic(trainer.state_dict(), path)
        return {index for index, _ in writes}

    assert save_and_count(100) == {0, 1, 2, 3, 4}  # slots 0-99
    first_bytes = sum(size for _, size in writes)
    assert save_and_count(30) == {4, 5, 6}  # slots 100-129 (and 96-133 around them)
    assert sum(size for _, size in writes) < 0.7 * first_bytes
    assert save_and_count(400) == {0, 1, *range(6, 25)}  # slots 130-499 then 0-29: the ring wrapped
    assert save_and_count(50) == {1, 2, 3, 4}  # slots 30-79
    assert save_and_count(0) == {3, 4}  # nothing added: only the 4-slot margins around the head (76-83)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "checkpoint.chunks").rglob("*.pt"))
    state = load_checkpoint(path)
    assert files == sorted(entry["file"] for entry in state["replay"]["rows"].entries)  # 25 chunks, no garbage
    assert len(files) == 25
    assert_same_replay(loaded_replay(path, trainer.buffer), trainer.buffer)
    trainer.close()


def agent_tensors(trainer: SACTrainer) -> list[torch.Tensor]:
    """Every network's parameters and log alpha."""
    nets = ("actor", "qf1", "qf2", "qf1_target", "qf2_target")
    return [trainer.agent.log_alpha.detach()] + [
        t for name in nets for t in getattr(trainer.agent, name).state_dict().values()
    ]


def test_resume_from_a_run_checkpointed_many_times_is_exact(tmp_path, monkeypatch):
    """Six checkpoints, chunks reused across them, the ring wrapping twice: after every save the checkpoint's replay
    equals the live one bit for bit, and a trainer resumed from the last one continues exactly as one given the
    same state in memory (no files). Broken on purpose once: no margin around the write head in
    `_SavedChunks.unchanged` (`first = self.pos`, `touched = adds`) leaves a stale chunk (the `sampleable` flags an
    add changes beside its slot) and fails the bitwise comparison."""
    trainer = chunked_trainer(monkeypatch, learning_starts=1000)  # updates from step 1000 on, few: Atari is slow
    path = tmp_path / "checkpoint.pt"
    # The head stops on chunk boundaries (100, 140, 40 after the wrap), where an add changes a flag in the chunk
    # before its own (sampleable[pos - 1]) or after it (sampleable[pos + 1 .. pos + 3] once the ring is full).
    for steps in (100, 40, 400, 301, 64, 157):
        trainer.collect(steps)
        save_atomic(trainer.state_dict(), path)
        assert_same_replay(loaded_replay(path, trainer.buffer), trainer.buffer)
    assert trainer.global_step == 1062 and trainer.buffer.written == trainer.buffer.slots  # wrapped twice

    in_memory = trainer.state_dict()  # the same state, the replay as views of the live tensors
    trainer.close()
    resumed = []
    for state in (load_checkpoint(path), {**in_memory, "replay": {**in_memory["replay"]}}):
        resumed.append(tiny_trainer(learning_starts=1000))
        resumed[-1].load_state_dict(state)  # restores the global RNGs too: one resumed trainer after the other
        resumed[-1].collect(60)
    from_files, from_memory = resumed
    assert from_files.num_updates == from_memory.num_updates == 30
    for a, b in zip(agent_tensors(from_files), agent_tensors(from_memory), strict=True):
        assert torch.equal(a, b)
    assert_same_replay(from_files.buffer, from_memory.buffer)
    from_files.close()
    from_memory.close()


def test_a_crash_between_the_chunks_and_the_main_file_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """The second save dies after writing its new chunks, before replacing the main file: the first checkpoint
    still loads and holds exactly the replay of its time, and the next save still rewrites every chunk changed since
    that first checkpoint. Broken on purpose once: collecting unreferenced chunks before the main file is written
    (in `save_atomic`) deletes a chunk the first checkpoint needs, and loading it fails."""
    import agents.infra.checkpoint as checkpoint

    trainer = chunked_trainer(monkeypatch, learning_starts=100_000)
    path = tmp_path / "checkpoint.pt"
    trainer.collect(100)
    save_atomic(trainer.state_dict(), path)
    at_first = {name: getattr(trainer.buffer, name)[:100].clone() for name in REPLAY_FIELDS}
    first_state = trainer.state_dict()["replay"]
    trainer.collect(450)  # wraps: every chunk the first checkpoint references has a newer version

    def crash(state, path):
        raise OSError("simulated crash after the chunks, before the main file")

    real_write_main = checkpoint._write_main
    monkeypatch.setattr(checkpoint, "_write_main", crash)
    try:
        save_atomic(trainer.state_dict(), path)
        raise AssertionError("the save did not crash")
    except OSError:
        pass
    assert len(list((tmp_path / "checkpoint.chunks").rglob("*.pt"))) > 5  # new chunks are there, unreferenced
    restored = loaded_replay(path, trainer.buffer)
    assert (restored.pos, restored.written) == (first_state["pos"], 100)
    for name in REPLAY_FIELDS:
        assert torch.equal(getattr(restored, name)[:100], at_first[name]), name

    monkeypatch.setattr(checkpoint, "_write_main", real_write_main)
    save_atomic(trainer.state_dict(), path)
    assert_same_replay(loaded_replay(path, trainer.buffer), trainer.buffer)
    state = load_checkpoint(path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "checkpoint.chunks").rglob("*.pt"))
    assert files == sorted(entry["file"] for entry in state["replay"]["rows"].entries)  # the orphans are gone
    trainer.close()


def test_a_format_2_checkpoint_with_the_replay_inline_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before the replay moved to chunk files (format 2) resume: their replay is read from the
    payload. Broken on purpose once: READABLE_VERSIONS = (3,) refuses it ("checkpoint format 2, expected 3")."""
    import agents.infra.checkpoint as checkpoint

    trainer = chunked_trainer(monkeypatch, learning_starts=100_000)
    trainer.collect(120)
    state = trainer.state_dict()
    replay, buffer = state["replay"], trainer.buffer
    old_replay = {key: replay[key] for key in ("slots", "pos", "written", "_next_first")}
    old_replay.update({name: getattr(buffer, name)[: buffer.written].clone() for name in REPLAY_FIELDS})
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)
    save_atomic({**state, "replay": old_replay}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 3)
    assert not (tmp_path / "checkpoint.chunks").exists()
    restored = tiny_trainer()
    restored.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt"))
    buffer.break_episodes()  # what a resume does to the live buffer too
    assert_same_replay(restored.buffer, buffer)
    save_atomic(restored.state_dict(), tmp_path / "checkpoint.pt")  # the next save writes format 3, all chunks
    assert_same_replay(loaded_replay(tmp_path / "checkpoint.pt", buffer), buffer)
    trainer.close()
    restored.close()


# ---------------------------------------------------------------------------------------------------------------
# The pair buffer in chunk files: a checkpoint writes only the chunks of the pairs added since the last one


def chunked_pairs(monkeypatch, capacity: int = 50, chunk_pairs: int = 10):
    from agents.feedback.pairs import FIELDS, PairBuffer

    buffer = PairBuffer(capacity, fragment_length=3, frame_shape=(4, 4), stack=2, device="cpu")
    row_bytes = sum(getattr(buffer, name)[:1].nbytes for name in FIELDS)
    monkeypatch.setattr(PairBuffer, "CHUNK_BYTES", chunk_pairs * row_bytes)
    return buffer


def loaded_pairs(path, capacity: int = 50):
    from agents.feedback.pairs import PairBuffer

    buffer = PairBuffer(capacity, fragment_length=3, frame_shape=(4, 4), stack=2, device="cpu")
    buffer.load_state_dict(load_checkpoint(path)["pairs"])
    return buffer


def assert_same_pairs(restored, live) -> None:
    from agents.feedback.pairs import FIELDS

    assert (restored.pos, restored.size, restored.total_added) == (live.pos, live.size, live.total_added)
    for name in FIELDS:
        restored_rows, live_rows = getattr(restored, name)[: live.size], getattr(live, name)[: live.size]
        torch.testing.assert_close(restored_rows, live_rows, rtol=0, atol=0, equal_nan=True, msg=name)  # NaN: unknown


def test_a_second_checkpoint_writes_only_the_chunks_of_the_pairs_added_since_the_first(tmp_path, monkeypatch):
    """Chunks of 10 pairs in a FIFO of 50: each save writes the chunks the new pairs went into, also once the FIFO
    has wrapped, and the checkpoint always loads as the live buffer. Broken on purpose once: `_SavedPairChunks.
    unchanged` returning {} (every chunk rewritten) fails the second count."""
    from tests.test_preference import make_pairs

    buffer = chunked_pairs(monkeypatch)
    writes = count_chunk_writes(monkeypatch)
    path = tmp_path / "checkpoint.pt"
    added = 0

    def save_and_count(new_pairs: int) -> set[int]:
        nonlocal added
        if new_pairs:
            buffer.add(make_pairs(list(range(added, added + new_pairs))))
            added += new_pairs
        writes.clear()
        save_atomic({"pairs": buffer.state_dict()}, path)
        assert_same_pairs(loaded_pairs(path), buffer)
        return {index for index, _ in writes}

    assert save_and_count(25) == {0, 1, 2}  # rows 0-24
    assert save_and_count(7) == {2, 3}  # rows 25-31
    assert save_and_count(0) == set()
    assert save_and_count(30) == {3, 4, 0, 1}  # rows 32-49 then 0-11: the FIFO wrapped
    assert save_and_count(60) == {0, 1, 2, 3, 4}  # more than the FIFO holds: every row new
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "checkpoint.chunks").rglob("*.pt"))
    assert files == sorted(entry["file"] for entry in load_checkpoint(path)["pairs"]["rows"].entries)


def test_a_checkpoint_with_the_pairs_inline_oldest_first_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before the pairs moved to chunk files hold the stored pairs inline, oldest first."""
    from agents.feedback.pairs import FIELDS
    from tests.test_preference import make_pairs, stored_ids

    buffer = chunked_pairs(monkeypatch, capacity=5)
    buffer.add(make_pairs([0, 1, 2, 3, 4, 5, 6]))  # wrapped: rows hold 5, 6, 2, 3, 4
    stored = buffer.get(buffer.oldest_first())
    old = {"total_added": buffer.total_added, **{name: getattr(stored, name) for name in FIELDS}}
    save_atomic({"pairs": old}, tmp_path / "checkpoint.pt")
    restored = loaded_pairs(tmp_path / "checkpoint.pt", capacity=5)
    assert stored_ids(restored) == stored_ids(buffer) == [2, 3, 4, 5, 6]
    assert restored.total_added == 7
    save_atomic({"pairs": restored.state_dict()}, tmp_path / "checkpoint.pt")  # the next save: chunk files
    assert stored_ids(loaded_pairs(tmp_path / "checkpoint.pt", capacity=5)) == [2, 3, 4, 5, 6]


def test_a_pair_checkpoint_larger_than_the_runs_pair_buffer_is_refused(tmp_path, monkeypatch):
    from tests.test_preference import make_pairs

    buffer = chunked_pairs(monkeypatch)
    buffer.add(make_pairs(list(range(30))))
    save_atomic({"pairs": buffer.state_dict()}, tmp_path / "checkpoint.pt")
    try:
        loaded_pairs(tmp_path / "checkpoint.pt", capacity=20)
    except ValueError as err:
        assert "holds 30 pairs" in str(err) and "--pair-buffer" in str(err)
    else:
        raise AssertionError("a checkpoint of 30 pairs loaded into a buffer of 20")


def test_the_checkpoint_benchmark_saves_the_replay_and_the_pairs(tmp_path, capsys):
    """sobirl/bench_checkpoint.py at a tiny size (a smoke run of the measurement, not a timing)."""
    from sobirl.bench_checkpoint import main

    results = main(["--steps", "300", "--buffer-size", "200", "--save-every", "100", "--pairs-per-save", "5",
                    "--pair-buffer", "12", "--directory", str(tmp_path), "--json"])  # fmt: skip
    assert results["chunked_saves"] == results["whole_saves"] == 3
    assert results["whole_chunk_rows"] == 200  # the whole layout: one chunk the size of the replay
    pair_bytes = 12 * (25 + 3) * 84 * 84 * 2  # the FIFO full at the last save (15 pairs added, 12 kept)
    assert results["chunked_bytes_per_save_last"] > 200 * 84 * 84 + pair_bytes
    assert '"chunked_saves": 3' in capsys.readouterr().out
