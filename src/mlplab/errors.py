class UserError(Exception):
    """A mistake in what the user asked for or supplied: shown as one line, exit status 2."""
