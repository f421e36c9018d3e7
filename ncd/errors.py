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
