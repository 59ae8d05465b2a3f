"""How a run ends early, and what main() turns each into: a problem the user must fix (one line, exit 1),
or a stop signal (exit 128 + its number)."""


class Fatal(Exception):
    """A problem the user must fix; main() prints it as one line and exits."""


class Stopped(Exception):
    """A stop signal ended the run; main() exits with 128 + its number, as shells and schedulers expect
    (130 for Ctrl-C, 143 for SIGTERM), so that a job script does not carry on as if training had finished."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
