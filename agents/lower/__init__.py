"""The lower level every preference algorithm shares: SAC-discrete's networks, replay, agent, trainer and evaluation."""
