"""The one exception type that reaches the user as a single clear line."""


class VisionLoraError(Exception):
    """A problem with the user's data, settings or files, stated in one line.

    The command line prints it as ``error: <message>`` and exits non-zero; other
    exceptions are bugs and keep their traceback under ``--debug``.
    """
