"""The one-call GPU measurement (`sobirl/bench.py --gpu-report`): its CPU dry run runs every section and prints every
figure, with the CUDA-only ones marked n/a."""

from __future__ import annotations

import json
import time

from tests.conftest import run_script


def test_gpu_report_dry_run_on_cpu():
    """Broken on purpose: `update_figures` calling `ready.updates_without_sync()` without k -> the report carried an
    `update_error` key and this test failed."""
    start = time.perf_counter()
    result = run_script("sobirl/bench.py", "--gpu-report", "--dry-run", "--no-cuda", "--json", timeout=240)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [key for key in report if key.endswith("_error") or report[key] == "skipped: over the time budget"]
    for key in ("torch", "device", "cpu", "commit"):
        assert report[key]
    for n in (1, 4, 8):
        assert report[f"env_steps_per_s_{n}"] > 0
    assert report["update_eager_ms"] > 0 and report["update_graph_ready_ms"] > 0
    assert report["bound_4_over_t_graph_ready"] == 4000 / report["update_graph_ready_ms"]
    for algo in ("drlhf", "sobirl"):
        for n in (1, 4):
            for mode in ("eager", "graph_ready"):
                assert report[f"loop_{algo}_{n}env_{mode}"] > 0
    assert report["projected_min_sobirl_4env_graph_ready"] > 0
    for algo in ("drlhf", "sobirl"):  # the overlapped order needs send/recv: Atari only
        assert report[f"loop_{algo}_4env_graph_ready_async"] == "n/a on MinAtar (no send/recv)"
    for key in ("kernel_ms_per_update", "update_graphed_ms", "host_syncs_per_vector_step_sobirl_4env_graph_ready"):
        assert report[key] == "n/a on CPU"
    assert seconds < 120, seconds  # "well under a minute" on an idle CPU; the margin is for shared CI cores


def test_dry_run_needs_gpu_report():
    from tests.conftest import assert_usage_error

    assert_usage_error(run_script("sobirl/bench.py", "--dry-run"), "--dry-run")
