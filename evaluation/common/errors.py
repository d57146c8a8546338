"""Errors whose message is the whole story: run.py prints them without a stack trace."""


class HarnessError(Exception):
    """Bad input (config, data, model path); the message names what is wrong and how to fix it."""


class ConfigError(HarnessError, ValueError):
    pass
