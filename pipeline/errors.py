"""One root error; children also subclass the builtin a caller would expect."""


class TilepipeError(Exception):
    """Root of every error tilepipe raises on purpose."""


class WorkflowError(TilepipeError, ValueError):
    """A workflow file or override that does not validate; the message names the field."""


class InputError(TilepipeError, OSError):
    """An input raster that cannot be processed; the message is one line naming the reason."""
