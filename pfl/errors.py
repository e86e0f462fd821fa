"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class PflUserError(Exception):
    """A problem the user can fix (bad recipe, missing data, bad path); never a bug in pfl."""


class ConfigError(PflUserError):
    """A recipe or --set value that is unknown, mistyped or out of range."""


class DataError(PflUserError):
    """A data set that is missing, unreadable or unsafe to load."""


class RunDirError(PflUserError):
    """A run directory that is missing, incomplete or not writable."""


class RunFailed(Exception):
    """A run that cannot go on (too few usable client updates in a round). The CLI prints one line, exit 1."""


class RunStopped(Exception):
    """A run stopped on purpose before its last round (a tuning trial pruned for lagging). Its partial
    output is removed; it is not a failure."""
