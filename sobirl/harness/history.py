"""Which run summaries were replaced by reruns: from the summaries themselves (the harness writes a `replaces`
record into a rerun's summary) and from the git history of the summary files.

The rule on git history: a summary was replaced when a committed version of its file has a `finished` time other
than the current file's. Only a new run writes a new `finished` (rewriting a summary's other fields, as migrations
did, keeps it), so each such time is a run that this one replaced. Without git (a copy of the summaries, a shallow
clone) only the `replaces` records are known, and the page says so.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

REPLACED_KEYS = ("finished", "final_return", "commits")  # what a rerun's summary keeps of the summary it replaced


def summary_path(result: dict) -> str:
    """A summary's path within its benchmark's folder: <game>/<arm>/seed<k>.json."""
    return f"{result['game']}/{result['arm']}/seed{int(result['seed'])}.json"


def replaced_record(old: dict) -> dict:
    """What a rerun's summary records of the summary it replaces."""
    return {key: old.get(key) for key in REPLACED_KEYS}


def _git(cwd: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, text=True, check=True).stdout


def committed_versions(folder: Path) -> dict[str, list[dict]] | str:
    """{path within `folder`: every committed version of that summary, oldest first} for the summaries under
    `folder` (<game>/<arm>/seed<k>.json), from git; or, where git cannot tell, why not."""
    folder = Path(folder)
    try:
        top = Path(_git(folder, "rev-parse", "--show-toplevel").strip()).resolve()
        shallow = _git(folder, "rev-parse", "--is-shallow-repository").strip() == "true"
        if shallow:
            return "git history not available (a shallow clone)"
        inside = folder.resolve().relative_to(top).as_posix()
        log = _git(top, "log", "--format=@%H", "--name-only", "--no-renames", "--", inside)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "git history not available"
    prefix = "" if inside == "." else inside + "/"
    touched: dict[str, list[str]] = defaultdict(list)
    commit = ""
    for line in log.splitlines():
        if line.startswith("@"):
            commit = line[1:]
        elif line.startswith(prefix) and line.endswith(".json") and "/seed" in line:
            touched[line].append(commit)
    requests = [(path, commit) for path, commits in touched.items() for commit in reversed(commits)]
    if not requests:
        return {}
    try:
        blobs = _cat_blobs(top, [f"{commit}:{path}" for path, commit in requests])
    except (OSError, subprocess.CalledProcessError):
        return "git history not available"
    versions: dict[str, list[dict]] = defaultdict(list)
    for (path, _), blob in zip(requests, blobs):
        if blob is None:  # the commit deleted the file
            continue
        try:
            versions[path[len(prefix) :]].append(json.loads(blob))
        except json.JSONDecodeError:
            continue
    return dict(versions)


def _cat_blobs(top: Path, objects: Sequence[str]) -> list[str | None]:
    """The contents of `objects` (commit:path) in one `git cat-file --batch`; None for a missing one."""
    out = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=top,
        input=("\n".join(objects) + "\n").encode(),
        capture_output=True,
        check=True,
    ).stdout
    blobs, at = [], 0
    for _ in objects:
        end = out.index(b"\n", at)
        header = out[at:end].split()
        if header[-1] == b"missing":
            blobs.append(None)
            at = end + 1
            continue
        size = int(header[2])
        blobs.append(out[end + 1 : end + 1 + size].decode())
        at = end + 1 + size + 1
    return blobs


def replaced_runs(results: Sequence[dict], history: Path | None) -> tuple[list[dict], str | None]:
    """([{game, arm, seed, replaced: [record, ...], current: record, found: "summary" / "git" / "summary, git"}]
    for every summary of `results` that replaced others, and None, or why git history was not available), where
    `history` is the benchmark's folder in a git checkout (None: not looked up)."""
    versions = committed_versions(history) if history is not None else "git history not looked up"
    unavailable = versions if isinstance(versions, str) else None
    out = []
    for result in results:
        found: dict[str, tuple[dict, set[str]]] = {}
        for record in result.get("replaces") or []:
            found.setdefault(str(record.get("finished")), (record, set()))[1].add("summary")
        if not unavailable:
            for old in versions.get(summary_path(result), []):
                finished = old.get("finished")
                if finished is None or finished == result.get("finished"):
                    continue
                found.setdefault(str(finished), (replaced_record(old), set()))[1].add("git")
        if found:
            records = sorted(found.values(), key=lambda item: str(item[0].get("finished")))
            sources = set().union(*(where for _, where in records))
            out.append(
                {
                    "game": result["game"],
                    "arm": result["arm"],
                    "seed": int(result["seed"]),
                    "replaced": [record for record, _ in records],
                    "current": replaced_record(result),
                    "found": ", ".join(sorted(sources, reverse=True)),
                }
            )
    return out, unavailable
