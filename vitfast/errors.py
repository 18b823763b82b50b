"""Errors that are the user's to fix (a typo, a wrong folder, a changed configuration): the CLI
prints their message -- one line, or a few for a checkpoint that does not fit -- and exits with
status 2, without a traceback."""


class UserError(Exception):
    """A mistake in the arguments or inputs, explained by its message."""
