"""One exception type for mistakes the user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input: the message says what to fix."""
