"""Errors a user can cause and fix; the CLI prints their message without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, flags, data on disk): the message says how to fix it."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset was asked for that has not been prepared in the data dir."""
