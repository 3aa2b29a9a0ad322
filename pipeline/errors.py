"""One root error; children also subclass the builtin a caller would expect."""


class TilepipeError(Exception):
    """Root of every error tilepipe raises on purpose."""


class WorkflowError(TilepipeError, ValueError):
    """A workflow file or override that does not validate; the message names the field."""


class InputError(TilepipeError, OSError):
    """An input raster that cannot be processed; the message is one line naming the reason."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: our own errors as they are, others with their type and cause."""
    if isinstance(exc, TilepipeError):
        text = str(exc).strip().splitlines()
        return text[0] if text else exc.__class__.__name__
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    if text and cause is not None and "See previous exception" in text[0] and str(cause).strip():
        # rasterio's "Write failed. See previous exception for details.": say what GDAL said
        text[0] = text[0].split(" See previous exception")[0] + f" ({str(cause).strip().splitlines()[0]})"
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__
