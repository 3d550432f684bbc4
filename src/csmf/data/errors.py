"""The one error type for unusable input data: it always names the file, the row or field, and the fix."""


class DataError(ValueError):
    """Input data that cannot be loaded. The message names the file and the line, row or column."""
