"""The benchmark harness behind `python sobirl/benchmark.py`, kept apart from the algorithms and the figure script.

declarations (the benchmarks and their arms) <- jobs (runs and where they stand) <- summaries (finished runs as
data; events reads the event files) <- runner (workers, locks, attempts); report and stats turn the summaries into
the results pages. Each module imports only those to its left.
"""
