"""The one record type every reader produces, and the checks every reader runs on it.

Offsets are character offsets into `Document.text`, end exclusive. Entities keep their
corpus-native type names; sites rename them later through a label map, so the readers
never decide what a site calls a concept.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Iterable, Mapping
from fedjax_lora.errors import DataError


_TMVAR = re.compile(r"^[a-z]?\|")  # tmVar variant ids: c|SUB|G|135|C, p|FS|Y|329||, |DEL|46|S
_NO_ID = ("", "-", "-1")


def where(source: str | os.PathLike | None, line: int | None = None,
          doc_id: str | None = None) -> str:
  """`file:line: [doc ID]` prefix used by every data error message."""
  parts = []
  if source:
    parts.append(f"{source}:{line}" if line else f"{source}")
  if doc_id:
    parts.append(f"document {doc_id}")
  return ": ".join(parts) if parts else "<input>"


@dataclasses.dataclass(frozen=True)
class Entity:
  """One mention. Discontinuous mentions list every piece in `fragments`.

  For a contiguous mention `fragments` is empty and `text == doc.text[start:end]`. For a
  discontinuous one, (start, end) is the first fragment and `text` is the fragments' texts
  joined by single spaces (the brat convention).
  """
  id: str
  start: int
  end: int
  type: str
  text: str
  fragments: tuple[tuple[int, int], ...] = ()
  concept: str = ""  # normalised identifier where the corpus gives one (MeSH, UMLS CUI, ...)

  @property
  def discontinuous(self) -> bool:
    return len(self.fragments) > 1

  @property
  def pieces(self) -> tuple[tuple[int, int], ...]:
    return self.fragments if self.fragments else ((self.start, self.end),)

  @property
  def concept_ids(self) -> tuple[str, ...]:
    """The ids in `concept`, in order, without repeats.

    Ids are separated by `,` (BioRED), `;` or, for composite mentions, `|` (BC5CDR,
    NCBI-disease, a few BioRED diseases: `D006470|D003556`). A tmVar variant id keeps its
    own `|`s (`c|SUB|G|135|C`, `|DEL|46|S`). `-` and `-1` (unnormalised) mean no id.
    """
    ids = []
    for piece in re.split(r"[,;]", self.concept):
      piece = piece.strip()
      ids.extend([piece] if _TMVAR.match(piece) else (p.strip() for p in piece.split("|")))
    return tuple(dict.fromkeys(c for c in ids if c not in _NO_ID))

  @property
  def concept_keys(self) -> tuple[str, ...]:
    """Every id a relation may name this mention by: `concept_ids`, plus each composite as
    written (`D006470|D003556`), since BioRED relates composites whole and BC5CDR by part."""
    whole = (p.strip() for p in re.split(r"[,;]", self.concept) if "|" in p)
    return tuple(dict.fromkeys([*self.concept_ids, *(w for w in whole if w not in _NO_ID)]))


@dataclasses.dataclass(frozen=True)
class Relation:
  """A directed, typed link between two entities of the same document (by entity id)."""
  head: str
  tail: str
  type: str
  id: str = ""


@dataclasses.dataclass(frozen=True)
class Document:
  """An annotated text plus where it came from, so errors downstream can name the source."""
  id: str
  text: str
  entities: tuple[Entity, ...] = ()
  relations: tuple[Relation, ...] = ()
  source: str = ""
  line: int | None = None
  meta: Mapping[str, object] = dataclasses.field(default_factory=dict)

  def where(self) -> str:
    return where(self.source, self.line, self.id)

  def entity(self, entity_id: str) -> Entity:
    for e in self.entities:
      if e.id == entity_id:
        return e
    raise KeyError(entity_id)


class _Lazy:
  """A message prefix built only when an error is actually raised (validation is hot)."""

  def __init__(self, make):
    self.make = make

  def __format__(self, spec):
    return format(self.make(), spec)


def _norm_space(s: str) -> str:
  return " ".join(s.split())


def validate_document(doc: Document, entity_types: Iterable[str] | None = None,
                      relation_types: Iterable[str] | None = None) -> None:
  """Raises DataError (naming file, line and document) on the first inconsistency.

  Checks: offsets inside the text and ordered, surface text equal to the text at the
  offsets (whitespace-normalised for discontinuous mentions), unique entity ids, relation
  arguments that exist, and types inside the given label sets.
  """
  entity_types = None if entity_types is None else frozenset(entity_types)
  relation_types = None if relation_types is None else frozenset(relation_types)
  n = len(doc.text)
  ids = set()
  for e in doc.entities:
    here = _Lazy(lambda e=e: f"{doc.where()}: entity {e.id} ({e.type} {e.text!r})")
    if e.id in ids:
      raise DataError(f"{here}: duplicate entity id")
    ids.add(e.id)
    for s, t in e.pieces:
      if not (0 <= s < t <= n):
        raise DataError(f"{here}: offsets {s}-{t} outside the text (length {n}) or empty")
    if e.fragments and (e.start, e.end) != e.fragments[0]:
      raise DataError(f"{here}: start/end {e.start}-{e.end} differ from the first fragment")
    if e.discontinuous:
      got = " ".join(doc.text[s:t] for s, t in e.pieces)
      ok = _norm_space(got) == _norm_space(e.text)
    else:
      got = doc.text[e.start:e.end]
      ok = got == e.text
    if not ok:
      raise DataError(f"{here}: span text {e.text!r} differs from the text at its offsets "
                      f"{got!r}")
    if entity_types is not None and e.type not in entity_types:
      raise DataError(f"{here}: unknown entity type {e.type!r}; known: "
                      f"{', '.join(sorted(entity_types))}")
  for r in doc.relations:
    here = _Lazy(lambda r=r: f"{doc.where()}: relation {r.id or ''} {r.type}({r.head}, {r.tail})")
    for arg in (r.head, r.tail):
      if arg not in ids:
        raise DataError(f"{here}: argument {arg!r} is not an entity of this document")
    if relation_types is not None and r.type not in relation_types:
      raise DataError(f"{here}: unknown relation type {r.type!r}; known: "
                      f"{', '.join(sorted(relation_types))}")


@dataclasses.dataclass
class Corpus:
  """Documents read from one corpus split, plus a count of everything that was skipped.

  `skipped` maps a reason (e.g. "entity label Parsing_Error") to how many items it
  removed; readers never drop anything without counting it here.
  """
  name: str
  split: str
  documents: list[Document]
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def entity_counts(self) -> collections.Counter:
    return collections.Counter(e.type for d in self.documents for e in d.entities)

  def relation_counts(self) -> collections.Counter:
    return collections.Counter(r.type for d in self.documents for r in d.relations)

  def summary(self) -> dict:
    return {
        "documents": len(self.documents),
        "entities": sum(self.entity_counts().values()),
        "relations": sum(self.relation_counts().values()),
        "entities_by_type": dict(sorted(self.entity_counts().items())),
        "relations_by_type": dict(sorted(self.relation_counts().items())),
        "skipped": dict(sorted(self.skipped.items())),
    }
