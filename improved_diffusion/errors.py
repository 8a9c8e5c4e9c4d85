"""
The errors of bad input. Every module may import this one; it imports
nothing of the package.

A :class:`UsageError` becomes one line ``error: <message>`` on stderr and
exit status 2 (``cli.run_main``).
"""


class UsageError(Exception):
    """
    Bad input from the user: scripts print ``error: <message>`` as one line
    on stderr and exit with status 2.

    :param agreed: True when every rank raised the same error at the same
        point (see ``cli.agree``): then only rank 0 prints it and every rank
        exits normally. Otherwise the rank that hit it prints it and takes
        the whole job down.
    """

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed


def pure_usage_error(message):
    """A UsageError that depends on the flags alone, hence the same on every rank."""
    return UsageError(message, agreed=True)


class NonFiniteSamplesError(UsageError):
    """NaN or inf in a sampled batch (found before the uint8 cast)."""
