"""The runner's errors: each names the file or folder and says what to do."""


class ConfigMismatchError(ValueError):
  """A checkpoint was written by a run with a different configuration."""


class IncompatibleCheckpointError(ConfigMismatchError):
  """A checkpoint was written by another version of the code: its format, its
  config's schema or the structure of the state it holds differs from this
  code's, so it cannot be resumed (only started afresh)."""


class CorruptCheckpointError(ValueError):
  """A checkpoint cannot be read, or its arrays differ from what was saved."""


class OutputWriteError(OSError):
  """Writing the results file or a checkpoint failed (full disk, read-only
  folder, ...); what was there before is unchanged."""


class OutputLockedError(RuntimeError):
  """Another process holds the output folder's lock (`output_lock`)."""
