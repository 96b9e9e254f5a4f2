"""Finding documents shared between corpora (data.md §4.4), so no test text is trained on.

Two keys: PubMed ids where both corpora carry them (PHEE, DDI-MedLine, BioRED), and
sentence text otherwise (NCBI-disease carries no PMIDs). Text is compared per sentence
after removing whitespace and case, which makes pre-tokenised text ("( HNF ) -6") equal
to running text ("(HNF)-6"); short sentences are ignored so boilerplate such as
"Results." does not make unrelated documents twins.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from fedjax_lora.data.records import Document
from fedjax_lora.data.windows import unit_bounds

MIN_SENTENCE_CHARS = 40


def normalise(text: str) -> str:
  return re.sub(r"\s+", "", text).lower()


def sentence_keys(doc: Document, min_chars: int = MIN_SENTENCE_CHARS) -> set[str]:
  keys = set()
  for a, b in unit_bounds(doc.text, "sentence"):
    key = normalise(doc.text[a:b])
    if len(key) >= min_chars:
      keys.add(key)
  return keys


def pmid(doc: Document) -> str | None:
  value = doc.meta.get("pmid")
  return str(value) if value else None


@dataclasses.dataclass(frozen=True)
class CorpusIndex:
  """A corpus's PMIDs and sentence keys, built once and matched against many splits."""
  pmids: frozenset
  sentences: frozenset


def index(docs: Iterable[Document], min_chars: int = MIN_SENTENCE_CHARS) -> CorpusIndex:
  docs = list(docs)
  return CorpusIndex(frozenset(p for d in docs if (p := pmid(d))),
                     frozenset().union(*(sentence_keys(d, min_chars) for d in docs)))


def overlapping(docs: Iterable[Document], others: Iterable[Document] | CorpusIndex,
                min_chars: int = MIN_SENTENCE_CHARS) -> dict[str, str]:
  """Ids of `docs` that also occur in `others` (documents or their index) -> the reason."""
  other = others if isinstance(others, CorpusIndex) else index(others, min_chars)
  found = {}
  for d in docs:
    p = pmid(d)
    if p is not None and p in other.pmids:
      found[d.id] = f"pmid {p}"
    elif sentence_keys(d, min_chars) & other.sentences:
      found[d.id] = "shared sentence text"
  return found
