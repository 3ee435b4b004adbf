class UserError(Exception):
    """A mistake in what the user asked for or supplied: shown as one line, exit status 2."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss went NaN or infinite: the run is marked FAILED with this message, exit status 1."""

    exit_code = 1


class RunKilled(Exception):
    """Ends a fit early on purpose (a search pruning its trial): the run is marked KILLED, not
    FAILED, with this message as the `mlplab.failure` tag."""
