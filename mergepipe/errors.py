"""One error type for everything a user can get wrong. The CLI prints its message as one line and
exits 2; library callers catch it like any ValueError."""


class MergepipeError(ValueError):
    """Bad input: the message names the file or value and what was expected."""


class InputChangedError(MergepipeError):
    """An input file no longer matches the hashes recorded at planning time."""


class IOFailure(MergepipeError):
    """The disk failed under a run (full, EIO): work already written is kept for a rerun to resume."""
