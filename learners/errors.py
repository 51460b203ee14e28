"""Errors raised on both sides of a process boundary, in a module of their own so that none of their users must import
another: ConfigError, which reports every bad input before anything starts (the config and the tracker settings both
raise it), and NonFiniteError, which aborts a diverged update (the learners and the in-process reference raise it,
the coordinator tells it from a lost process)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""


class NonFiniteError(RuntimeError):
    """A loss or logits went NaN/inf: the update is aborted before the optimizer step."""
