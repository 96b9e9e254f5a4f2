"""Site assembly: distinct, validated notes per site and split (the public API).

Each (seed, site, style, split) seeds its own `random.Random`; `fedjax_lora.data.synthetic`
re-exports these names with the tables.
"""

from __future__ import annotations

import hashlib
import random
from typing import Collection, Mapping, Sequence

from fedjax_lora.data.records import Corpus, Document, validate_document
from fedjax_lora.data.synthetic.grammar import Style, Writer, write_note
from fedjax_lora.data.synthetic.tables import (ENTITY_TYPES, KINDS, RELATION_TYPES, STYLE_MIX,
                                               STYLES)

SPLITS = ("train", "dev", "test")
DEFAULT_SITES = (("narrative_hospital", "narrative"), ("telegraphic_clinic", "telegraphic"),
                 ("discharge_summary", "discharge"))
DEFAULT_DOCS_PER_SITE = ((200, 20, 40), (120, 20, 40), (60, 20, 40))  # (train, dev, test)
DEFAULT_SEED = 0


def _stable_seed(*parts: object) -> int:
  """A seed independent of PYTHONHASHSEED and process: sha256 of the parts."""
  key = "\x1f".join(str(p) for p in parts).encode("utf-8")
  return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def make_site(name: str, style: str, num_docs: int, seed: int = DEFAULT_SEED,
              split: str = "train", exclude: Collection[str] = (),
              mix: Mapping[str, float] | None = None) -> Corpus:
  """`num_docs` distinct notes of one site in one style, none of whose texts is in `exclude`.

  `mix` overrides the style's clause-kind weights (see STYLE_MIX), i.e. the label mix.
  Deterministic in (name, style, num_docs, seed, split, exclude, mix).
  """
  if style not in STYLES:
    raise ValueError(f"unknown synthetic style {style!r}; known: {', '.join(STYLES)}")
  mix = dict(STYLE_MIX[style] if mix is None else mix)
  unknown = set(mix) - set(KINDS)
  if unknown or not any(v > 0 for v in mix.values()):
    raise ValueError(f"bad clause mix {mix!r}; kinds: {', '.join(KINDS)}")
  writer = Writer(Style(style), random.Random(_stable_seed(seed, name, style, split)))
  seen = set(exclude)
  docs: list[Document] = []
  attempts = 0
  while len(docs) < num_docs:
    attempts += 1
    if attempts > 100 * num_docs + 1000:
      raise ValueError(f"synthetic site {name!r}: cannot find {num_docs} distinct notes")
    b = write_note(writer, mix)
    text = b.text()
    if text in seen:
      continue
    seen.add(text)
    i = len(docs)
    doc = Document(id=f"{name}-{split}-{i:04d}", text=text, entities=tuple(b.entities),
                   relations=tuple(b.relations), source=f"synthetic:{name}", line=i + 1,
                   meta={"site": name, "style": style})
    validate_document(doc, ENTITY_TYPES, RELATION_TYPES)
    docs.append(doc)
  return Corpus(f"synthetic/{name}", split, docs)


def site_names(num_sites: int = len(DEFAULT_SITES)) -> list[tuple[str, str]]:
  """(name, style) of each site; beyond the defaults the styles repeat with a numeric suffix."""
  out = []
  for i in range(num_sites):
    name, style = DEFAULT_SITES[i % len(DEFAULT_SITES)]
    out.append((name if i < len(DEFAULT_SITES) else f"{name}_{i // len(DEFAULT_SITES) + 1}",
                style))
  return out


def synthetic_sites(num_sites: int = len(DEFAULT_SITES),
                    docs_per_site: Sequence = DEFAULT_DOCS_PER_SITE,
                    seed: int = DEFAULT_SEED) -> dict[str, dict[str, Corpus]]:
  """{site: {"train"|"dev"|"test": Corpus}}; no text appears twice across sites and splits.

  `docs_per_site` is one (train, dev, test) triple for every site, or a sequence of
  triples used per site in turn (cycled when there are more sites than triples).
  """
  if num_sites < 1:
    raise ValueError(f"num_sites must be >= 1, got {num_sites}")
  sizes = [tuple(docs_per_site)] if isinstance(docs_per_site[0], int) else \
      [tuple(t) for t in docs_per_site]
  for t in sizes:
    if len(t) != len(SPLITS) or any(n < 0 for n in t):
      raise ValueError(f"docs_per_site entries must be (train, dev, test) counts, got {t!r}")
  seen: set[str] = set()
  out: dict[str, dict[str, Corpus]] = {}
  for i, (name, style) in enumerate(site_names(num_sites)):
    out[name] = {}
    for split, n in zip(SPLITS, sizes[i % len(sizes)]):
      corpus = make_site(name, style, n, seed, split=split, exclude=seen)
      seen.update(d.text for d in corpus.documents)
      out[name][split] = corpus
  return out
