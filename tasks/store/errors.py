"""One error type for bad input files, so every command can report them the same way."""

from __future__ import annotations


class InputError(ValueError):
    """A problem with an input file; the message names the file and, when known, the row."""

    def __init__(self, path, reason, row=None):
        self.path = path
        self.row = row
        self.reason = reason
        where = f"{path}: row {row}" if row is not None else f"{path}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # Errors raised on a Dask worker travel back pickled; rebuild from the fields, not the message.
        return (type(self), (self.path, self.reason, self.row))


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect retry condition: retry I/O hiccups (OSError), never bad input or bugs."""
    try:
        state.result()
    except InputError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False
