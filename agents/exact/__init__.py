"""Exact tabular references: hyper-gradients of every method computed in float64 on small MDPs, against which
the tests check the training code's estimators. Nothing here trains on an environment."""
