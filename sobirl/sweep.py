"""Run algorithms x seeds (x any flag values) of the entry point, as local worker processes or a Slurm job array.

    python sobirl/sweep.py --algos sobirl,drlhf,sac --num-seeds 3 --workers 3 -- --total-timesteps 1e6
    python sobirl/sweep.py --grid "reward-lr=1e-4,3e-4" --seeds 1,2 --dry-run
    python sobirl/sweep.py --backend slurm --slurm-partition gpu --workers 16 -- --env-id BeamRiderNoFrameskip-v4

Everything after `--` is passed unchanged to every job. With the default entry point, every job's flags are parsed and
validated first, as the job itself would (a --grid over a flag that does not exist, or a bad value, is one line and
exit status 2 before anything runs). Each job is one process of the entry point, so the
script stays the only way to train and a sweep job is reproduced by copying its command line.
Slurm goes through submitit (`pip install -e ".[sweep]"`), imported only when asked for.

Ctrl-C (SIGINT) or SIGTERM to a local sweep is passed on to the running jobs, once per signal received: each saves
a checkpoint and exits, its log ending with the command that continues it; queued jobs do not start. The sweep
waits for the running jobs, reports, and exits with 130 (or 143).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agents.infra.cli import UsageError, build_parser, check_flags, flag, require, require_folder_name, run_cli

# Flags the sweep itself sets on every job; a second copy in --grid or after `--` would silently win in argparse.
RESERVED_FLAGS = ("algo", "seed")


@dataclasses.dataclass
class Args:
    algos: str = flag("sobirl,drlhf,sac", "comma-separated --algo values of the entry point")
    seeds: str = flag("", "comma-separated seeds, e.g. 1,2,3; empty: --num-seeds seeds counted from --start-seed")
    num_seeds: int = flag(3, "number of consecutive seeds, used when --seeds is not given")
    start_seed: int = flag(1, "first of the --num-seeds consecutive seeds")
    script: str = flag("sobirl/beamrider.py", "entry point run by every job")
    backend: str = flag(
        "local", "local: worker processes on this machine; slurm: a submitit job array", choices=["local", "slurm"]
    )
    workers: int = flag(1, "jobs running at once (local processes, or the Slurm array's parallelism cap)")
    gpus: str = flag(
        "",
        "local: comma-separated GPU ids dealt round-robin to jobs through CUDA_VISIBLE_DEVICES "
        "(empty: leave it alone, so all workers share the visible GPU)",
    )
    log_dir: str = flag("runs/sweep_logs", "one <job>.log per local job; submitit's folder for Slurm")
    dry_run: bool = flag(False, "print the commands and exit without running anything")
    slurm_partition: str = flag("", "Slurm partition; empty: the cluster's default")
    slurm_gpus_per_task: int = flag(1, "GPUs per Slurm task (0 for CPU-only jobs)")
    slurm_cpus_per_task: int = flag(8, "CPUs per Slurm task; jobs get OMP_NUM_THREADS to match")
    slurm_mem_gb: float = flag(0.0, "memory per Slurm task in GB; 0: the cluster's default")
    slurm_time_min: int = flag(24 * 60, "Slurm time limit per task, in minutes")
    slurm_signal_delay_s: int = flag(
        120,
        "seconds before the time limit at which a task is told to save and requeue itself (submitit's USR2); a "
        "run needs that long to save: a few seconds on MinAtar, minutes for an Atari replay of 1M steps",
    )
    slurm_wait: bool = flag(False, "block until the Slurm array ends and report each task's outcome")


@dataclasses.dataclass
class Job:
    name: str
    cmd: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Expanding the grid


def _flag_name(name: str) -> str:
    # Entry-point flags are --kebab-case (agents.infra.cli), so learning_rate and --learning-rate both work.
    return name.strip().lstrip("-").replace("_", "-")


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """["flag=v1,v2", ...] -> {"flag": ["v1", "v2"], ...}, in the order given."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = _flag_name(name)
        require(bool(sep) and bool(name), f"--grid {spec!r}: expected FLAG=V1,V2,...")
        require(name not in RESERVED_FLAGS, f"--grid {spec!r}: use --algos / --seeds for {name}")
        require(name not in grid, f"--grid {name} is given twice")
        items = [v.strip() for v in values.split(",")]
        require(all(items), f"--grid {spec!r}: empty value")
        grid[name] = items
    return grid


def flag_args(name: str, value: str) -> list[str]:
    """One flag setting as argv. true/false become --x / --no-x, the BooleanOptionalAction spelling."""
    name = _flag_name(name)
    if value.lower() == "true":
        return [f"--{name}"]
    if value.lower() == "false":
        return [f"--no-{name}"]
    return [f"--{name}", value]


def expand_grid(
    algos: Sequence[str], seeds: Sequence[int], grid: Mapping[str, Sequence[str]] | None = None
) -> list[list[str]]:
    """Every (seed, algo, grid point) as the entry point's arguments, without interpreter, script or passthrough.

    Seeds vary slowest, so a sweep stopped half-way has every algorithm on the first seeds rather than every seed
    of the first algorithm.
    """
    grid = dict(grid or {})
    names = list(grid)
    out = []
    for seed in seeds:
        for algo in algos:
            for values in itertools.product(*(grid[n] for n in names)):
                tail = ["--algo", algo, "--seed", str(seed)]
                for name, value in zip(names, values):
                    tail += flag_args(name, value)
                out.append(tail)
    return out


def job_name(tail: Sequence[str]) -> str:
    """Readable, file-name-safe name from the job's own arguments: sobirl__seed1__learning-rate=1e-4."""
    parts, i = [], 0
    while i < len(tail):
        token = tail[i].lstrip("-")
        has_value = i + 1 < len(tail) and not tail[i + 1].startswith("--")
        value = tail[i + 1] if has_value else None
        if token == "algo":
            parts.append(value)
        elif token == "seed":
            parts.append(f"seed{value}")
        else:
            parts.append(token if value is None else f"{token}={value}")
        i += 2 if has_value else 1
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))


def build_jobs(
    script: str,
    algos: Sequence[str],
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[str]],
    passthrough: Sequence[str],
    python: str = sys.executable,
) -> list[Job]:
    jobs, seen = [], set()
    for i, tail in enumerate(expand_grid(algos, seeds, grid)):
        name = job_name(tail)
        if name in seen:  # two values that differ only in characters a file name cannot hold
            name = f"{name}__{i}"
        seen.add(name)
        jobs.append(Job(name, [python, script, *tail, *passthrough]))
    return jobs


def check_jobs(script: str, jobs: Sequence[Job]) -> None:
    """Parse and validate each job's flags as its run would (it stops before building anything), when `script` is
    this repository's sobirl/beamrider.py: a bad flag or value fails here, once, instead of in every job. Another
    entry point's flags are its own business."""
    from sobirl import beamrider

    if Path(script).resolve() != Path(beamrider.__file__).resolve():
        return
    for job in jobs:
        try:
            check_flags(beamrider.main, job.cmd[2:])  # [python, script, *flags]
        except UsageError as err:
            algo = job.cmd[job.cmd.index("--algo") + 1]
            raise UsageError(
                f"job {job.name} would fail: {err} (python {script} --algo {algo} --help lists its flags)"
            ) from None


# ---------------------------------------------------------------------------------------------------------------
# Local backend


def local_env(workers: int, gpu: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # Without a cap every torch process starts one thread per core and the workers thrash each other.
    cores = len(os.sched_getaffinity(0))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, workers))))
    env.setdefault("PYTHONUNBUFFERED", "1")  # so `tail -f` on a job log shows progress as it happens
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


class SweepStopped(Exception):
    """The sweep was asked to stop (SIGINT or SIGTERM) and its running jobs have exited."""

    def __init__(self, signum: int, results: list[tuple[Job, int | None, float]]):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.results = results


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOPPED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # what a job stopped by either signal exits with


def run_local(
    jobs: Sequence[Job], workers: int, log_dir: Path, gpus: Sequence[str]
) -> list[tuple[Job, int | None, float]]:
    """Run the jobs `workers` at a time; returns (job, exit code, seconds) in the jobs' order.

    SIGINT or SIGTERM to the sweep is forwarded to every running job (each signal once: a second Ctrl-C makes a
    job that is not saving stop at once, as it does in a terminal); jobs not started yet never start (exit code
    None). Jobs run in their own process group, so a Ctrl-C in the terminal reaches them only through the sweep,
    once. When the running jobs have exited, SweepStopped carries the results.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, len(jobs)))
    received: list[int] = []  # stop signals, in order
    running: set[subprocess.Popen] = set()
    lock = threading.RLock()  # re-entrant: a second signal may arrive while the handler of the first holds it
    done_count = itertools.count(1)

    def run_one(index: int, job: Job) -> tuple[Job, int | None, float]:
        gpu = gpus[index % len(gpus)] if gpus else None
        env = local_env(workers, gpu)
        log_path = log_dir / f"{job.name}.log"
        start = time.monotonic()
        with lock:  # a job starts only if no stop signal has come, and is then forwarded every later one
            if received:
                return job, None, 0.0
            log = open(log_path, "w")
            prefix = f"CUDA_VISIBLE_DEVICES={gpu} " if gpu is not None else ""
            log.write(f"# OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {prefix}{shlex.join(job.cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    job.cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            except BaseException:
                log.close()
                raise
            running.add(proc)
        with log:
            rc = proc.wait()
        with lock:
            running.discard(proc)
        seconds = time.monotonic() - start
        if rc == 0:
            status = "ok"
        elif received and rc in STOPPED_EXIT_CODES:
            status = f"stopped (exit {rc}), log: {log_path}"
        else:
            status = f"FAILED (exit {rc}), log: {log_path}"
        print(f"[{next(done_count)}/{len(jobs)}] {job.name}: {status} ({seconds:.1f} s)", flush=True)
        return job, rc, seconds

    def forward(signum, frame) -> None:
        with lock:
            received.append(signum)
            procs = list(running)
        for proc in procs:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:  # it exited in the meantime
                pass
        name = signal.Signals(signum).name
        # os.write, not print: the handler may interrupt a print of the main thread.
        os.write(
            2,
            (
                f"\n{name}: passed on to {len(procs)} running job(s), which save a checkpoint and exit; "
                f"queued jobs will not start. Waiting for the running jobs...\n"
            ).encode(),
        )

    handle_signals = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if handle_signals else {}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run_one, i, job) for i, job in enumerate(jobs)]
            results = [f.result() for f in futures]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise SweepStopped(received[0], results)
    return results


def report(
    results: Sequence[tuple[Job, int | None, float]], log_dir: Path | None = None, stopped: int | None = None
) -> None:
    """Print how the jobs ended; exit 1 if any failed (unless the sweep was stopped by signal `stopped`: then the
    caller exits with that signal's status)."""
    not_started = [job for job, rc, _ in results if rc is None]
    ended = [(job, rc) for job, rc, _ in results if rc is not None]
    interrupted = [(job, rc) for job, rc in ended if stopped is not None and rc in STOPPED_EXIT_CODES]
    failed = [(job, rc) for job, rc in ended if rc != 0 and (job, rc) not in interrupted]
    print(f"\n{sum(rc == 0 for _, rc in ended)} of {len(results)} jobs succeeded")
    if stopped is not None:
        print(
            f"stopped by {signal.Signals(stopped).name}: {len(interrupted)} job(s) saved a checkpoint and exited, "
            f"{len(not_started)} not started",
            file=sys.stderr,
        )
        for job, rc in interrupted:
            where = f"; the command that continues it is in {log_dir / f'{job.name}.log'}" if log_dir else ""
            print(f"  stopped: {job.name} (exit {rc}){where}", file=sys.stderr)
        for job in not_started:
            print(f"  not started: {job.name}", file=sys.stderr)
    for job, rc in failed:
        print(f"  failed: {job.name} (exit {rc})", file=sys.stderr)
    if failed and stopped is None:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------------------------
# Slurm backend (submitit)


def run_job(cmd: list[str], cwd: str) -> int:
    """Run the job's command in the folder the sweep was started from; a failure raises, so that submitit (and
    sacct) mark the task as failed instead of a "successful" rc != 0."""
    rc = subprocess.run(cmd, cwd=cwd, env=task_env()).returncode
    if rc != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}")
    return rc


def task_env() -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and "SLURM_CPUS_PER_TASK" in env:
        env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
    return env


def ignore_checkpoint_signal() -> None:
    """In the run's process: ignore submitit's checkpoint signal (USR2), which Slurm may send to every process of
    the task and whose default action would kill the run before it saves; the task passes it on as SIGTERM."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class ResumableTask:
    """What each Slurm array task runs: one job in a fixed run folder, checkpointable by submitit.

    Before the time limit (--slurm-signal-delay-s ahead) or on preemption, submitit calls `checkpoint` in the
    task's process: it passes SIGTERM to the run, which finishes its step, saves a checkpoint and exits, and returns
    the task that resumes that folder (`--resume`), which submitit requeues. Without a checkpoint yet (stopped
    during start-up) the requeued task starts the job afresh."""

    def __init__(self, cmd: list[str], cwd: str, run_dir: str, resume: bool = False, save_timeout: float = 600.0):
        self.cmd, self.cwd, self.run_dir, self.resume = list(cmd), cwd, run_dir, resume
        self.save_timeout = save_timeout
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        if self.resume:
            return [*self.cmd[:2], "--resume", self.run_dir]  # interpreter, script; the checkpoint has the rest
        return self.cmd

    def __call__(self) -> int:
        folder = Path(self.cwd) / self.run_dir
        if not self.resume and folder.is_dir() and not (folder / "checkpoint.pt").exists():
            shutil.rmtree(folder)  # a start stopped before its first checkpoint: nothing in it to resume
        self.process = subprocess.Popen(self.command(), cwd=self.cwd, env=task_env(),
                                        preexec_fn=ignore_checkpoint_signal)  # fmt: skip
        # Polling, not wait(): `checkpoint` runs in a signal handler on this thread and polls the same process.
        while (rc := self.process.poll()) is None:
            time.sleep(0.5)
        if rc != 0:
            raise RuntimeError(f"{shlex.join(self.command())} exited with {rc}")
        return rc

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            deadline = time.time() + self.save_timeout
            while self.process.poll() is None and time.time() < deadline:
                time.sleep(0.2)
        saved = (Path(self.cwd) / self.run_dir / "checkpoint.pt").exists()
        return DelayedSubmission(ResumableTask(self.cmd, self.cwd, self.run_dir, resume=saved or self.resume,
                                               save_timeout=self.save_timeout))  # fmt: skip


def run_folder(cmd: Sequence[str], name: str) -> tuple[list[str], str]:
    """The job's command with a fixed run folder (`--run-name` under its --runs-dir), so that a requeued task can
    resume it; returns the command and that folder."""
    runs_dir = "runs"
    for i, token in enumerate(cmd):
        if token == "--runs-dir" and i + 1 < len(cmd):
            runs_dir = cmd[i + 1]
        elif token.startswith("--runs-dir="):
            runs_dir = token.split("=", 1)[1]
    if "--run-name" in cmd or any(t.startswith("--run-name=") for t in cmd):
        raise UsageError("--run-name after `--`: the Slurm backend names each job's run folder itself")
    return [*cmd, "--run-name", name], str(Path(runs_dir) / name)


def make_executor(args: Args, num_jobs: int, cluster: str = "slurm"):
    try:
        import submitit
    except ImportError:
        raise UsageError('--backend slurm needs submitit: pip install -e ".[sweep]"') from None
    folder = Path(args.log_dir) / "slurm" / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as err:  # submitit's own check that srun exists
        raise UsageError(f"--backend slurm: {err} (use --backend local off the cluster)") from None
    executor.update_parameters(
        name="sobirl-sweep",
        timeout_min=args.slurm_time_min,
        slurm_signal_delay_s=args.slurm_signal_delay_s,
        cpus_per_task=args.slurm_cpus_per_task,
        mem_gb=args.slurm_mem_gb or None,
        slurm_partition=args.slurm_partition or None,
        slurm_gpus_per_task=args.slurm_gpus_per_task or None,
        slurm_array_parallelism=min(args.workers, num_jobs),
    )
    if cluster == "local":
        # submitit's local executor (the tests' stand-in for Slurm) sends the same signal from its own controller;
        # AutoExecutor does not pass it a signal delay, so it is set on the executor underneath.
        executor._executor.parameters["signal_delay_s"] = args.slurm_signal_delay_s
    return executor


def submit_slurm(jobs: Sequence[Job], args: Args, cluster: str = "slurm") -> list:
    """Submit all jobs as one array; `cluster="local"` runs the same path through submitit's local executor."""
    executor = make_executor(args, len(jobs), cluster)
    cwd = os.getcwd()
    tasks = []
    for job in jobs:
        cmd, run_dir = run_folder(job.cmd, job.name)
        tasks.append(ResumableTask(cmd, cwd, run_dir, save_timeout=max(args.slurm_signal_delay_s - 10, 10)))
    # One array whose tasks are the checkpointable objects themselves: submitit checkpoints a task's function.
    with executor.batch():
        submitted = [executor.submit(task) for task in tasks]
    print(
        f"submitted {len(submitted)} tasks as array {submitted[0].job_id.split('_')[0]} "
        f"({executor.cluster}); submitit logs in {Path(args.log_dir) / 'slurm'}"
    )
    for job, task in zip(jobs, submitted):
        print(f"  {task.job_id}: {job.name}")
    return submitted


def wait_slurm(jobs: Sequence[Job], submitted: Sequence) -> list[tuple[Job, int, float]]:
    results = []
    for job, task in zip(jobs, submitted):
        try:
            task.result()
            rc = 0
        except Exception as err:  # submitit re-raises the task's error, or reports a cancelled/killed task
            lines = str(err).strip().splitlines() or [repr(err)]
            reason = next((line for line in lines if "exited with" in line), lines[0]).strip()
            print(f"{job.name} ({task.job_id}): {reason}; log: {task.paths.stdout}", file=sys.stderr)
            rc = 1
        results.append((job, rc, 0.0))
    return results


# ---------------------------------------------------------------------------------------------------------------


def parse_seeds(args: Args) -> list[int]:
    if args.seeds.strip():
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    else:
        require(args.num_seeds > 0, f"--num-seeds must be positive, got {args.num_seeds}")
        seeds = list(range(args.start_seed, args.start_seed + args.num_seeds))
    require(bool(seeds), "--seeds is empty")
    require(len(set(seeds)) == len(seeds), f"--seeds has duplicates: {args.seeds}")
    return seeds


def parse_sweep_args(argv: Sequence[str] | None) -> tuple[Args, dict[str, list[str]], list[str]]:
    """Split off everything after `--` for the jobs, then parse the sweep's own flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser(Args, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FLAG=V1,V2",
        help="values of one entry-point flag to sweep; repeat for a cartesian product",
    )
    namespace = vars(parser.parse_args(argv))
    grid = parse_grid(namespace.pop("grid"))
    return Args(**namespace), grid, passthrough


def main(argv: Sequence[str] | None = None) -> list[tuple[Job, int, float]]:
    args, grid, passthrough = parse_sweep_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    require(bool(algos), "--algos is empty")
    require(len(set(algos)) == len(algos), f"--algos has duplicates: {args.algos}")
    seeds = parse_seeds(args)
    require(args.workers > 0, f"--workers must be positive, got {args.workers}")
    require_folder_name(args, "log_dir")
    require(Path(args.script).is_file(), f"--script {args.script} does not exist (run from the repository root)")
    for token in passthrough:
        if token.startswith("--") and _flag_name(token.split("=", 1)[0]) in RESERVED_FLAGS:
            raise UsageError(f"{token} after `--` would override the sweep's own; use --algos / --seeds")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    jobs = build_jobs(args.script, algos, seeds, grid, passthrough)
    check_jobs(args.script, jobs)

    if args.dry_run:
        points = len(jobs) // (len(algos) * len(seeds))
        print(
            f"# {len(jobs)} jobs: {len(algos)} algos x {len(seeds)} seeds x {points} grid points "
            f"({args.backend} backend)"
        )
        workers = min(args.workers, len(jobs))
        for i, job in enumerate(jobs):
            if args.backend == "local":
                env = local_env(workers, gpus[i % len(gpus)] if gpus else None)
                prefix = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
                prefix += f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if gpus else ""
                print(prefix + shlex.join(job.cmd))
            else:
                print(shlex.join(job.cmd))
        return []

    if args.backend == "slurm":
        submitted = submit_slurm(jobs, args)
        if not args.slurm_wait:
            return []
        try:
            results = wait_slurm(jobs, submitted)
        except KeyboardInterrupt:
            array = submitted[0].job_id.split("_")[0]
            print(
                f"\nstopped waiting; array {array} keeps running on the cluster (scancel {array} cancels it)",
                file=sys.stderr,
            )
            raise SystemExit(130) from None
    else:
        workers = min(args.workers, len(jobs))
        print(
            f"running {len(jobs)} jobs, {workers} at a time, "
            f"OMP_NUM_THREADS={local_env(workers, None)['OMP_NUM_THREADS']}, logs in {args.log_dir}/",
            flush=True,
        )
        try:
            results = run_local(jobs, args.workers, Path(args.log_dir), gpus)
        except SweepStopped as stop:
            report(stop.results, Path(args.log_dir), stopped=stop.signum)
            raise SystemExit(128 + stop.signum) from None
    report(results)
    return results


if __name__ == "__main__":
    run_cli(main)
