"""Where the shared, uncommitted workspace (corpora, tokenizers) lives.

One setting: the FEDJAX_LORA_SHARED environment variable, defaulting to `../shared`
beside the repository root.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ENV = "FEDJAX_LORA_SHARED"


def shared_dir() -> Path:
  return Path(os.environ.get(SHARED_ENV, REPO_ROOT.parent / "shared")).expanduser()
