"""Corpus names -> reader calls, so configs name corpora instead of paths and formats.

A site's `corpus` is one of:
* a known corpus (CORPORA), read from `<shared>/data/raw/<folder>`;
* `synthetic/<site>`, the embedded generator, which needs nothing on disk;
* `hf:<dir or hub id>`, a `datasets` dataset;
* your own files, `<format>:<PATH>` with format `pubtator`, `brat` or `iob` (the readers
  of BioRED, Chia and NCBI-disease). PATH (`~` expanded, relative to the working
  directory) is one of:
  - a folder of splits. PubTator and IOB: one file per split, whose name up to its first
    dot is the split name, any case (`train.tsv`, `Dev.PubTator`, `test.txt`). brat: one
    subfolder per split (`train/`, `dev/`, `test/`) holding `.txt`/`.ann` pairs, nested
    folders allowed;
  - a path containing `{split}`, replaced by the split name
    (`pubtator:/data/cdr/CDR_{split}Set.PubTator.txt` with `train_split="Training"`);
  - one file (PubTator, IOB) or one brat folder holding `.ann` files itself: a single
    collection without splits, which a site may use for one split only (e.g. an external
    site's test split; sites.py rejects it for more).
  The split names are the site's `train_split`/`dev_split`/`test_split`. Labels are read
  as the files have them; the site's label maps rename or drop them.
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
# <format>:<PATH> -> "module:function" reading one file (or, for brat, one folder) into
# (documents, skipped counts).
PATH_FORMATS = {"pubtator": "pubtator:read_pubtator", "brat": "brat:read_brat_folder",
                "iob": "iob:read_iob"}
SPLIT_FIELD = "{split}"


def _loader(spec: str) -> Callable:
  module, fn = spec.split(":")
  return getattr(importlib.import_module(f"fedjax_lora.data.{module}"), fn)


def _path_format(name: str) -> tuple[str, str] | None:
  """(format, PATH) for `<format>:<PATH>`, else None."""
  fmt, sep, path = name.partition(":")
  return (fmt, path) if sep and fmt in PATH_FORMATS else None


def _split_names(paths) -> str:
  return ", ".join(p.name for p in paths) or "nothing"


def _brat_has_documents(folder: Path) -> bool:
  return any(p.is_file() for p in folder.glob("*.ann"))


def single_collection(name: str) -> bool:
  """True if `<format>:<PATH>` names one file or one brat folder: no splits to choose from."""
  parsed = _path_format(name)
  if parsed is None or SPLIT_FIELD in parsed[1]:
    return False
  fmt, path = parsed
  path = Path(path).expanduser()
  return _brat_has_documents(path) if fmt == "brat" else path.is_file()


def split_path(name: str, split: str) -> Path:
  """The file (brat: folder) that holds `split` of corpus `<format>:<PATH>`."""
  parsed = _path_format(name)
  if parsed is None:
    raise ValueError(f"{name!r} is not <format>:<PATH> with format in {sorted(PATH_FORMATS)}")
  fmt, raw = parsed
  want_dir = fmt == "brat"
  kind = "folder" if want_dir else "file"
  if not raw:
    raise DataError(f"corpus {name!r}: no PATH after {fmt + ':'!r}")
  if SPLIT_FIELD in raw:
    path = Path(raw.replace(SPLIT_FIELD, split)).expanduser()
    if not (path.is_dir() if want_dir else path.is_file()):
      raise DataError(f"corpus {name!r}: split {split!r}: {kind} {path} not found ({SPLIT_FIELD} "
                      "in the path stands for the split name)")
    return path
  path = Path(raw).expanduser()
  if not path.exists():
    raise DataError(f"corpus {name!r}: {path} not found")
  if not want_dir and path.is_file():
    return path  # a single collection, whatever the split (sites.py allows it for one split)
  if not path.is_dir():
    raise DataError(f"corpus {name!r}: {path} is not a folder")
  entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
  if want_dir:
    subs = [p for p in entries if p.is_dir() and p.name.lower() == split.lower()]
    if _brat_has_documents(path):
      if subs:
        raise DataError(f"corpus {name!r}: {path} holds both .ann files and a {subs[0].name}/ "
                        "split folder; keep documents in split folders only, or point PATH at one")
      return path  # a single collection
    expected = f"a subfolder {split}/ holding .txt/.ann pairs"
    found = _split_names(p for p in entries if p.is_dir())
  else:
    subs = [p for p in entries if p.is_file() and p.name.split(".")[0].lower() == split.lower()]
    example = f"{split}.PubTator" if fmt == "pubtator" else f"{split}.tsv"
    expected = f"one file named {split}.<ext> (e.g. {example})"
    found = _split_names(p for p in entries if p.is_file())
  if len(subs) == 1:
    return subs[0]
  if subs:
    raise DataError(f"corpus {name!r}: split {split!r} is ambiguous in {path}: "
                    f"{_split_names(subs)}; keep one")
  raise DataError(f"corpus {name!r}: no split {split!r} in {path}: expected {expected}; "
                  f"found: {found}")


def _load_path_corpus(name: str, split: str) -> Corpus:
  fmt, _ = _path_format(name)
  docs, skipped = _loader(PATH_FORMATS[fmt])(split_path(name, split))
  return Corpus(name, split, docs, skipped)


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
  """Reads `split` of corpus `name` (see the module docstring for the forms of `name`)."""
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
  if _path_format(name) is not None:
    return _load_path_corpus(name, split)
  if name not in CORPORA:
    known = sorted(CORPORA) + [f"{SYNTHETIC_PREFIX}<site>", f"{HF_PREFIX}<dataset>"] + \
        [f"{fmt}:<path>" for fmt in PATH_FORMATS]
    raise DataError(f"unknown corpus {name!r}; known: {', '.join(known)}")
  info = CORPORA[name]
  if split not in info.splits:
    raise DataError(f"corpus {name!r} has splits {list(info.splits)}, not {split!r}")
  folder = Path(root) if root is not None else raw_dir() / info.folder
  if not folder.is_dir():
    raise DataError(f"corpus {name!r}: folder {folder} not found (set {SHARED_ENV} to the "
                    "shared workspace, or run without corpora to use the synthetic default)")
  return _loader(info.loader)(folder, split, **dict(info.kwargs))
