"""Infrastructure of a run: command-line flags and errors, the run lifecycle, checkpoints, memory checks.
(No torch import in this package's __init__ or in cli.py, so scripts that only parse flags start fast.)"""
