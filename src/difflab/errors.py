"""The project's one error type for bad input a user can fix; every package may import it.

`ConfigError` subclasses ValueError so that a library caller's `except ValueError` still catches
it. The CLI turns it (and only it) into one line `difflab: error: ...` and exit 2: any other
exception is a bug in difflab and keeps its traceback. A ValueError is left for an internal
invariant (a shape a caller inside difflab got wrong), never for something a user typed.
"""


class ConfigError(ValueError):
    """A user-facing problem with the config, command line or an input file; the message says
    the fix (re-exported as difflab.config.ConfigError)."""
