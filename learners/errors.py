"""The error every bad input is reported with, before anything starts (its own module: the config and the tracker
settings both raise it, and neither may import the other)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and how to fix it."""
