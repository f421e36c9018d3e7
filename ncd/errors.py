"""The one error type the command line turns into a clear message and a non-zero exit."""


class NcdError(Exception):
    """Bad input: the message names the bad value and what was expected.

    ``python -m ncd`` prints ``error: <message>`` to stderr and exits with status 2.
    """
