"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key): the message names it and what was expected."""
