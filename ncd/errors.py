"""The one error type the command line turns into a clear message and a non-zero exit."""


class NcdError(Exception):
    """Bad input: the message names the bad value and what was expected.

    ``python -m ncd`` prints ``error: <message>`` to stderr and exits with status 2.
    """


class Preempted(Exception):
    """The cluster asked a training step to stop (SLURM's time-limit signal, preemption).

    Its last.ckpt holds the state; ``python -m ncd`` exits with :attr:`exit_code` and a rerun
    (Snakemake's retry) resumes from it.
    """

    exit_code = 75  # EX_TEMPFAIL: failed for now; the retry continues it


class WriteError(NcdError, OSError):
    """A file could not be written (full disk, read-only folder, quota): the message names the path.

    Both an :class:`NcdError` (``python -m ncd`` prints it as one line, exit 2) and an
    :class:`OSError` (code that already handles failed writes keeps working).
    """

    def __str__(self) -> str:
        # OSError's own str would be "[Errno N] strerror: filename" once errno is set
        return str(self.args[0]) if self.args else super().__str__()


class LockedError(NcdError):
    """Another ``python -m ncd`` process is already running in the same output folder."""
