"""Turns the library's input errors into one clear line instead of a traceback."""

import sys

from absl import app

from fedjax_lora.errors import (ConfigError, DataError, DeployError, IdentityError,
                                LedgerError, ResumeError, SecAggError, WireError)
from models.errors import (AdapterError, CheckpointError, ModelConfigError,
                           QuantizationError, TokenizerError)

INPUT_ERRORS = (CheckpointError, AdapterError, TokenizerError, ModelConfigError, DataError,
                ConfigError, IdentityError, LedgerError, SecAggError, ResumeError, DeployError,
                WireError, QuantizationError)


def run(main):
  """`absl.app.run(main)`, printing `error: <message>` and exiting 2 on bad input."""
  def guarded(argv):
    try:
      return main(argv)
    except INPUT_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
