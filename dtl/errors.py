"""Exit codes and the one exception type that means "the user can fix this"."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
#: Bad flag, bad file, missing data: nothing was written, fix the input and run again.
EXIT_USAGE = 2
#: Stopped on SIGTERM/SIGUSR1/SIGINT after writing a checkpoint of the current step.
#: 75 is sysexits' EX_TEMPFAIL ("try again later"): schedulers and the SLURM templates requeue on it.
EXIT_PREEMPTED = 75


class UserError(Exception):
    """A problem with the user's input that they can fix; printed as one message, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the policy says abort."""


class PeerError(Exception):
    """Another rank failed (its own message is in this one: one line per distinct error); this rank stops with
    `exit_code` (2 when every failure was a user error, else 1)."""

    def __init__(self, summary: str, exit_code: int) -> None:
        super().__init__(summary)
        self.exit_code = exit_code
