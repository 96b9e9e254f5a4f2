"""The federation library's error classes, in one place.

Each is raised on bad input or a setting that cannot work, with a message that names the
file and line, the config field or the directory; `launch/errors.py` prints them as one
`error: ...` line.
"""


class ConfigError(ValueError):
  """A federation setting that cannot work; raised before any training."""


class ResumeError(ValueError):
  """A workdir that cannot be resumed as asked (names the directory and what to do)."""


class DataError(ValueError):
  """Bad input data. The message starts with `file:line:` (or the document id)."""


class TemplateError(DataError):
  """The prompt format cannot be rendered with this tokenizer; the message names the field."""


class SecAggError(ValueError):
  """Secure aggregation cannot proceed safely or correctly."""


class LedgerError(ValueError):
  """A ledger file that cannot be read or used (names the file and line)."""


class IdentityError(ValueError):
  """A key or registry file that cannot be used (names the file and the problem)."""


class WireError(ValueError):
  """A deployed message that cannot be decoded or does not fit the run (names its kind and
  field)."""


class DeployError(ValueError):
  """A deployment that cannot start or go on (names the site, node, file or flag)."""
