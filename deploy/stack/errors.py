"""Set-up errors: each carries one line telling the user what to do."""


class SetupError(Exception):
    """A problem with the machine or configuration that the user must fix.

    The message is a single actionable line; the runner prints it without a traceback.
    """
