"""The preference pipeline every algorithm shares: the outer loop, reward training, the loss seam and off-policy
corrections, ensembles and the reward model."""
