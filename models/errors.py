"""The model side's input errors, in one place: each names the file, field or directory."""


class ModelConfigError(ValueError):
  """A config.json is unreadable or incomplete; the message names the file and field."""


class UnsupportedConfigError(ModelConfigError):
  """A checkpoint config uses a field or value this implementation does not support."""


class CheckpointError(ValueError):
  """A checkpoint directory is missing, truncated or inconsistent; the message names what."""


class AdapterError(ValueError):
  """An adapter directory is malformed or does not fit the base model; the message names why."""


class TokenizerError(ValueError):
  """A tokenizer directory that cannot be loaded or does not fit."""


class QuantizationError(ValueError):
  """A quantization setting that is invalid or does not fit the base; names it or the tensor."""
