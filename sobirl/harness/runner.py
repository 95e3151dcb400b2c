"""The runner: local workers, one job (one process, one thread) each, sharing a benchmark's queue.

`run` skips finished runs, resumes runs that saved a checkpoint (`--resume`) and starts the others, seed-major (every
arm has the same seeds at any moment). A lock file per job lets several `run`s share one queue. Ctrl-C or SIGTERM
stops every running job with a checkpoint; the next `run` goes on. Each running job's step, speed and ETA are read
from its event file (the job logs have no progress bar) and printed every --progress-every seconds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sobirl.harness.events import Progress, ProgressReader
from sobirl.harness.jobs import REPO, Job, Layout, job_state, lock_held, source_lost
from sobirl.harness.summaries import append_attempt, git_commit, machine, write_summary

STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}


def claim(path: Path) -> bool:
    """Take the job's lock file for this process (atomically: O_EXCL), unless a live process holds it; a lock left
    by a dead process is taken over. Several `run`s of one benchmark can so share its queue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if lock_held(path):
                return False
            path.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


class Runner:
    """Local workers, one job (one process, one thread) each; a stop signal is passed on to every running job."""

    def __init__(self, jobs: Sequence[Job], layout: Layout, workers: int, progress_every: float = 60.0):
        self.layout, self.workers = layout, workers
        self.progress_every = progress_every  # seconds between progress lines of the running jobs; 0: none
        self.queue = list(jobs)
        self.lock = threading.Condition()
        self.running: dict[str, subprocess.Popen] = {}
        self.taken: set[str] = set()  # jobs a worker has taken off the queue and not yet finished with
        self.stop_signal: int | None = None
        self.failed: list[tuple[Job, int]] = []
        self.done = 0
        self.durations: list[float] = []
        self.started_at = time.time()
        # The running jobs' progress, from their event files: (job, when it started, reader, latest progress).
        self.watched: dict[str, tuple[Job, float, ProgressReader, Progress | None]] = {}
        self.printed_steps: dict[str, int] = {}  # the step each job's last progress line named

    # -- scheduling ------------------------------------------------------------------------------------------------

    def source_progress(self, job: Job) -> str:
        """ready (no source, or it finished and no worker holds it), waiting (it is queued or held, here or in
        another `run`) or blocked (nobody will run it)."""
        source = job.source
        if source is None:
            return "ready"
        # `taken` covers the moment between a worker taking the source off the queue and claiming its lock. A source
        # whose final checkpoint is written is still held until its worker has logged the exit and the summary.
        held = source.key in self.taken or lock_held(source.lock_path(self.layout))
        if (
            not held
            and job_state(source, self.layout) in ("finished", "complete")
            and not source_lost(job, self.layout)
        ):
            return "ready"
        if held or any(queued.key == source.key for queued in self.queue):
            return "waiting"
        return "blocked"

    def next_job(self) -> Job | None:
        """The first queued job whose source run (if any) is finished; None when the queue is empty or stopped.
        Waits while the queued jobs wait on sources that are being run."""
        with self.lock:
            while True:
                if self.stop_signal is not None or not self.queue:
                    return None
                progress = [self.source_progress(job) for job in self.queue]
                if "ready" in progress:
                    job = self.queue.pop(progress.index("ready"))
                    self.taken.add(job.key)
                    return job
                for job, state in zip(list(self.queue), progress):
                    if state == "blocked":
                        print(f"blocked: {job.key} (needs {job.source.key}, which nobody is running)", flush=True)
                        self.queue.remove(job)
                self.lock.wait(timeout=5)

    def worker(self) -> None:
        while (job := self.next_job()) is not None:
            self.run_job(job)
            with self.lock:
                self.taken.discard(job.key)
                self.lock.notify_all()

    def eta(self, now: float | None = None) -> str:
        """The time left for every queued and running job, shared by the workers (and never less than the longest
        running job's): a running job's own ETA where its event file gives one; any other job the mean time of the
        runs finished so far or, before the first, the running jobs' projected times; "-" until one is known."""
        now = time.time() if now is None else now
        left, projected = {}, []
        for key, (job, begin, _, progress) in self.watched.items():
            seconds = job_eta(job, progress, now)
            if seconds is not None:
                left[key] = seconds
                projected.append(now - begin + seconds)
        known = self.durations or projected
        if not known:
            return "-"
        per_run = sum(known) / len(known)
        running = []
        for key in self.running:
            begin = self.watched[key][1] if key in self.watched else now
            running.append(left.get(key, max(0.0, per_run - (now - begin))))
        shared = (sum(running) + len(self.queue) * per_run) / self.workers
        return duration_text(max([shared, *running]))

    def counts(self, now: float | None = None) -> str:
        return f"[{self.done} done, {len(self.running)} running, {len(self.queue)} queued, ETA {self.eta(now)}]"

    # -- progress --------------------------------------------------------------------------------------------------

    def watch(self, job: Job, began: float | None = None) -> None:
        """Follow a job just started (or resumed) through its event file."""
        began = time.time() if began is None else began
        self.watched[job.key] = (job, began, progress_reader(job, self.layout), None)

    def report_progress(self, now: float | None = None) -> None:
        """One line per running job that has logged steps since its last line: its step, speed and ETA."""
        now = time.time() if now is None else now
        lines = []
        with self.lock:
            watched = list(self.watched.items())
        for key, (job, begin, reader, _) in watched:
            try:
                progress = reader.read()
            except Exception:  # noqa: BLE001 - a damaged event file must not stop the benchmark
                progress = None
            with self.lock:
                if key in self.watched:
                    self.watched[key] = (job, begin, reader, progress)
            if progress is not None and progress.step != self.printed_steps.get(key):
                self.printed_steps[key] = progress.step
                lines.append(progress_text(job, progress, now, reader.learning_starts))
        if lines:
            with self.lock:
                counts = self.counts(now)
            for line in lines:
                print(f"{counts} progress: {line}", flush=True)

    def run_job(self, job: Job) -> None:
        lock = job.lock_path(self.layout)
        if not claim(lock):
            print(f"skipped: {job.key} (another `run` is on it)", flush=True)
            return
        try:
            self.run_claimed(job)
        finally:
            lock.unlink(missing_ok=True)

    def run_claimed(self, job: Job) -> None:
        layout, run_dir = self.layout, job.run_dir(self.layout)
        state = job_state(job, layout)
        if state == "finished":
            return
        if state == "complete":
            print(f"summary: {job.key} ({write_summary(job, layout)})", flush=True)
            return
        if job.arm.demos and not job.demos_path(layout).is_file() and not self.record_demos(job):
            return
        if state == "partial":
            event, command = "resume", job.resume_command(layout, sys.executable)
        else:
            event, command = "start", job.command(layout, sys.executable)
            if run_dir.exists():  # a start that died before its first checkpoint: nothing in it can be resumed
                shutil.rmtree(run_dir)
        attempts = job.attempts_path(layout)
        if job.rerun and event == "start" and attempts.is_file():  # the lost run's attempts are not this run's
            attempts.replace(attempts.with_suffix(".lost.jsonl"))
        record = {"event": event, "time": time.time(), **git_commit(), "machine": machine(), "workers": self.workers}
        append_attempt(attempts, record)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        # The runs use this checkout's code, even where an editable install points at another checkout.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
        begin = time.time()
        with open(job.log_path(layout), "a") as log, self.lock:
            log.write(f"\n$ {shlex.join(command)}\n")
            log.flush()
            # A session of its own: a Ctrl-C in the terminal reaches the harness, which passes it on once.
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
            self.running[job.key] = process
            self.watch(job)
            print(f"{self.counts()} {event}: {job.key}", flush=True)
        rc = process.wait()
        seconds = time.time() - begin
        device = device_of(job.log_path(layout))
        append_attempt(attempts, {"event": "exit", "time": time.time(), "rc": rc, "seconds": seconds, "device": device})
        with self.lock:
            self.running.pop(job.key, None)
            self.watched.pop(job.key, None)
            if rc == 0:
                self.done += 1
                self.durations.append(seconds)
        if rc == 0:
            print(f"finished: {job.key} in {seconds / 60:.1f} min -> {write_summary(job, layout)}", flush=True)
        elif rc in STOPPED.values() and self.stop_signal is not None:
            print(f"stopped: {job.key} (checkpoint saved; the next run resumes it)", flush=True)
        else:
            self.failed.append((job, rc))
            print(f"FAILED: {job.key} exit {rc}; see {job.log_path(layout)}", flush=True)

    def record_demos(self, job: Job) -> bool:
        """Record the job's demonstrations (once per game, under a lock of their own); False if that failed."""
        path = job.demos_path(self.layout)
        lock = path.with_suffix(".lock")
        while not claim(lock):
            time.sleep(2)  # another worker is recording them
        try:
            if path.is_file():
                return True
            command = job.demos_command(self.layout, sys.executable)
            print(f"demos: {shlex.join(command)}", flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
            with open(path.with_suffix(".log"), "a") as log:
                rc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                self.failed.append((job, rc))
                print(f"FAILED: demonstrations for {job.key} (exit {rc}); see {path.with_suffix('.log')}", flush=True)
            return rc == 0
        finally:
            lock.unlink(missing_ok=True)

    # -- stopping --------------------------------------------------------------------------------------------------

    def forward(self, signum, frame) -> None:
        with self.lock:
            if self.stop_signal is None:
                print(f"\n{signal.Signals(signum).name}: stopping {len(self.running)} job(s) with a checkpoint; "
                      f"queued jobs do not start", flush=True)  # fmt: skip
            self.stop_signal = self.stop_signal or signum
            for process in self.running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            self.lock.notify_all()

    def run(self) -> None:
        previous = {sig: signal.signal(sig, self.forward) for sig in STOPPED}
        try:
            threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.workers)]
            for thread in threads:
                thread.start()
            reported = time.time()
            while any(thread.is_alive() for thread in threads):
                for thread in threads:
                    thread.join(timeout=0.5)
                if self.progress_every and time.time() - reported >= self.progress_every:
                    self.report_progress()
                    reported = time.time()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def device_of(log_path: Path) -> str | None:
    """The device a run reported ("run NAME (algo) on cpu: ...") in its log, last attempt first."""
    try:
        found = re.findall(r"^run \S+ \(\w+\) on (\S+):", log_path.read_text(), flags=re.M)
    except OSError:
        return None
    return found[-1] if found else None


def progress_reader(job: Job, layout: Layout) -> ProgressReader:
    """A reader of the job's event file that measures its speed once learning has started (from the start, for an
    arm that never learns within its steps, like random play)."""
    starts = int(job.bench.flag(job.arm, "--learning-starts") or 0)
    return ProgressReader(job.run_dir(layout), starts if starts < job.bench.steps else 0)


def job_eta(job: Job, progress: Progress | None, now: float) -> float | None:
    """Seconds until the job reaches its last step at its speed so far; None while its speed is unknown."""
    if progress is None or not progress.speed:
        return None
    return max(0.0, (job.bench.steps - progress.step) / progress.speed - (now - progress.wall_time))


def progress_text(job: Job, progress: Progress | None, now: float, learning_starts: int = 0) -> str:
    """ "KEY at step S of T (P%), V steps/s, ETA E" from the job's event file."""
    if progress is None:
        return f"{job.key}: no step logged yet"
    total = job.bench.steps
    text = f"{job.key} at step {progress.step:,} of {total:,} ({100 * progress.step / total:.0f}%)"
    seconds = job_eta(job, progress, now)
    if seconds is None:
        return text + f", ETA from step {learning_starts + ProgressReader.MIN_SPAN:,} on"
    text += f", {progress.speed:,.0f} steps/s, ETA {duration_text(seconds)}"
    quiet = now - progress.wall_time
    return text + (f" (nothing logged for {duration_text(quiet)})" if quiet >= 120 else "")


def duration_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
