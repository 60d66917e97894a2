"""The one exception type for bad user input: the CLI prints it without a traceback."""


class UserError(Exception):
    """Something the user gave (a path, option, config value, URI) is wrong; the message says how to fix it."""
