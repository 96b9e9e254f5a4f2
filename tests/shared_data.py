"""Locating ../shared for tests: skip with a reason outside CI, fail under CI=true."""

import os

import pytest

from fedjax_lora.paths import SHARED_ENV, shared_dir


def require_shared(*relative: str):
  """Returns shared_dir()/relative, or skips (fails when CI=true) if it is missing."""
  path = shared_dir().joinpath(*relative)
  if not path.exists():
    msg = (f"{path} not found; point {SHARED_ENV} at the shared workspace "
           "(default ../shared beside the repository)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path
