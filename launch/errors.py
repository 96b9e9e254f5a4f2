"""Turns the library's input errors into one clear line instead of a traceback."""

import sys

from absl import app

from fedjax_lora.data.records import DataError
from fedjax_lora.privacy.secagg import SecAggError
from fedjax_lora.security.identity import IdentityError
from fedjax_lora.security.ledger import LedgerError
from fedjax_lora.simulator import ConfigError as FederationConfigError
from fedjax_lora.simulator import ResumeError
from models.config import ConfigError
from models.hf_checkpoint import CheckpointError
from models.peft_io import AdapterError
from models.tokenizer import TokenizerError

INPUT_ERRORS = (CheckpointError, AdapterError, TokenizerError, ConfigError, DataError,
                FederationConfigError, IdentityError, LedgerError, SecAggError, ResumeError)


def run(main):
  """`absl.app.run(main)`, printing `error: <message>` and exiting 2 on bad input."""
  def guarded(argv):
    try:
      return main(argv)
    except INPUT_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
