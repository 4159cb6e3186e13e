"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a missing file, a corrupt checkpoint, a bad setting).

    The message names the problem and the fix. The CLI prints it as one line, never a traceback.
    """
