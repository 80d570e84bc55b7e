"""User-facing errors.

Every problem caused by the user's input is raised as a ``LeaksegError`` (or a
subclass) with a message that names the problem. The CLI prints it as one line
on stderr with a non-zero exit code; the napari widgets show it as a
notification. Anything else is a bug.
"""

from __future__ import annotations


class LeaksegError(ValueError):
    """A problem with the user's input, settings or files. The message is shown as is."""


class InputError(LeaksegError):
    """Bad image, label or scribble data (dims, dtype, NaNs, shapes...)."""


class ModelFileError(LeaksegError):
    """A model file that is missing, corrupt, from another capability or version."""


class OutputExistsError(LeaksegError):
    """An output path exists and overwriting was not requested."""


class DeviceError(LeaksegError):
    """An explicitly requested device is not available."""


class MemoryEstimateError(LeaksegError):
    """The job would need more memory than is available; tile it or use zarr."""


class JobCancelled(Exception):
    """Thrown into a job generator when the user asks it to stop.

    A generator may catch it and ``return`` its best result so far; the driver
    then reports that result as a cancelled-but-kept result.
    """
