"""The preference pipeline every algorithm shares: the outer loop, reward training, losses and off-policy
corrections, pairs, ensembles, the reward model, replay, networks and evaluation."""
