"""The one exception every layer raises for a mistake the user can fix: a config key, a column, a file,
a location, credentials, a request. The CLI prints it as one line and exits 2; Serve answers it as a 4xx.

It sits below everything else (`jobs → pipelines → models → config → errors`), so any layer can raise it.
"""


class UserError(Exception):
    """A mistake the user can fix (config, data, location). Reported as one line, no traceback."""
