"""The one error type of the environment layer, importable without gymnasium or ale-py."""


class InvalidEnvError(ValueError):
    """An environment id or setting that cannot be built; the message names the flag and the value."""
