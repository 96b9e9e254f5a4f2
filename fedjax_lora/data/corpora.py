"""Corpus names -> reader calls, so configs name corpora instead of paths and formats.

Real corpora live under `<shared>/data/raw/<folder>`; `synthetic/<site>` is the embedded
generator, which needs nothing on disk; `hf:<dir or hub id>` reads a `datasets` dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from pathlib import Path
from typing import Callable

from fedjax_lora.data.records import Corpus, DataError
from fedjax_lora.paths import SHARED_ENV, shared_dir


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  folder: str
  loader: str           # "module:function", called as function(root, split, **kwargs)
  splits: tuple[str, ...]
  kwargs: tuple = ()


CORPORA = {
    "biored": CorpusInfo("biored", "pubtator:load_biored", ("train", "dev", "test")),
    "chia": CorpusInfo("chia", "brat:load_chia", ("train", "dev", "test")),
    "ddi": CorpusInfo("ddi", "ddi_xml:load_ddi", ("train", "dev", "test", "ner_test")),
    "phee": CorpusInfo("phee", "phee_jsonl:load_phee", ("train", "dev", "test")),
    "e3c": CorpusInfo("e3c_en", "e3c_xmi:load_e3c", ("train", "test"), (("layer", 1),)),
    "e3c_layer2": CorpusInfo("e3c_en", "e3c_xmi:load_e3c", ("silver", "validated"),
                             (("layer", 2),)),
    "e3c_iob": CorpusInfo("e3c_en", "iob:load_e3c_iob", ("train", "test", "silver")),
    "ncbi_disease": CorpusInfo("ncbi_disease_iob", "iob:load_ncbi_disease",
                               ("train", "dev", "test")),
}
SYNTHETIC_PREFIX = "synthetic/"
HF_PREFIX = "hf:"  # hf:<dataset directory saved with save_to_disk, or hub id when online>


def _loader(spec: str) -> Callable:
  module, fn = spec.split(":")
  return getattr(importlib.import_module(f"fedjax_lora.data.{module}"), fn)


def raw_dir() -> Path:
  return shared_dir() / "data" / "raw"


@functools.lru_cache(maxsize=4)
def _synthetic(seed: int):
  from fedjax_lora.data import synthetic
  # The three default sites, then three more hospitals in the same styles (`<name>_2`),
  # which evaluation configs hold out as external or new sites. Sites are generated in
  # order, so adding later ones never changes the earlier ones.
  return synthetic.synthetic_sites(num_sites=2 * len(synthetic.DEFAULT_SITES), seed=seed)


def load_corpus(name: str, split: str, root: str | os.PathLike | None = None,
                seed: int = 0) -> Corpus:
  """Reads `split` of corpus `name` (see CORPORA, or synthetic/<site>)."""
  if name.startswith(SYNTHETIC_PREFIX):
    sites = _synthetic(seed)
    site = name[len(SYNTHETIC_PREFIX):]
    if site not in sites:
      raise DataError(f"unknown synthetic site {site!r}; known: {', '.join(sorted(sites))}")
    if split not in sites[site]:
      raise DataError(f"synthetic site {site!r} has splits {sorted(sites[site])}, not {split!r}")
    return sites[site][split]
  if name.startswith(HF_PREFIX):
    from fedjax_lora.data.hf_dataset import load_hf
    return load_hf(name[len(HF_PREFIX):], split)
  if name not in CORPORA:
    known = sorted(CORPORA) + [f"{SYNTHETIC_PREFIX}<site>", f"{HF_PREFIX}<dataset>"]
    raise DataError(f"unknown corpus {name!r}; known: {', '.join(known)}")
  info = CORPORA[name]
  if split not in info.splits:
    raise DataError(f"corpus {name!r} has splits {list(info.splits)}, not {split!r}")
  folder = Path(root) if root is not None else raw_dir() / info.folder
  if not folder.is_dir():
    raise DataError(f"corpus {name!r}: folder {folder} not found (set {SHARED_ENV} to the "
                    "shared workspace, or run without corpora to use the synthetic default)")
  return _loader(info.loader)(folder, split, **dict(info.kwargs))
