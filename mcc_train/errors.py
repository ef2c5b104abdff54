"""The one exception type a user sees as a single line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
