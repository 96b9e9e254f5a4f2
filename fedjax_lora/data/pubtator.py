"""PubTator reader (BioRED, BioCreative V CDR, NCBI-disease in PubTator form, ...).

A document is `PMID|t|title`, `PMID|a|abstract`, then tab-separated annotation lines:
mentions `PMID start end text type [concept ids [part texts]]` and document-level
relations `PMID type id1 id2 [novelty]` between concept ids (not mentions). Offsets are
over title + " " + abstract.

Concept ids of a mention, in the conventions of the public releases:
* one id (`D009270`, `3172`), or several for a composite mention, separated by `,`
  (BioRED: `3172,3651`) or `|` (BC5CDR, NCBI-disease: `D006470|D003556`); BioRED's tmVar
  variant ids (`c|SUB|G|135|C`) contain `|` but are one id (see `Entity.concept_ids`).
  A relation may name a composite by one of its ids (BC5CDR) or whole (BioRED);
* BC5CDR writes one more column after a composite mention's ids, the text of each part
  (`fever|chills`). It is kept in `Document.meta["mention_parts"]` (entity id -> parts);
  a part count that differs from the id count is counted, not an error;
* `-1`: an unnormalised mention. It is an entity without a concept id, so no relation
  can name it, and a relation argument `-1` is an error.

Concept-level relations become mention-level `Relation`s: every mention carrying id1
paired with every mention carrying id2 (a composite mention carries each of its ids), all
sharing the concept relation's id (`Rn`), so the concept count stays recoverable and a
later window split can tell whether any pair of a concept relation survived.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Iterable

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

BIORED_ENTITY_TYPES = ("GeneOrGeneProduct", "DiseaseOrPhenotypicFeature", "ChemicalEntity",
                       "OrganismTaxon", "SequenceVariant", "CellLine")
BIORED_RELATION_TYPES = ("Association", "Positive_Correlation", "Negative_Correlation", "Bind",
                         "Cotreatment", "Comparison", "Drug_Interaction", "Conversion")
BIORED_SPLITS = {"train": "Train.PubTator", "dev": "Dev.PubTator", "test": "Test.PubTator"}
# BioCreative V CDR (BC5CDR): chemical-induced disease relations between MeSH ids.
BC5CDR_ENTITY_TYPES = ("Chemical", "Disease")
BC5CDR_RELATION_TYPES = ("CID",)
NO_CONCEPT = "-1"  # the concept id PubTator corpora give an unnormalised mention

_HEADER = re.compile(r"^([^|\t]+)\|([ta])\|(.*)$")
class _Builder:
  """Collects the lines of one document, then checks and assembles it."""

  def __init__(self, pmid: str, source: str, line: int):
    self.pmid, self.source, self.line = pmid, source, line
    self.title: str | None = None
    self.abstract: str | None = None
    self.mentions: list[tuple[int, list[str]]] = []
    self.relations: list[tuple[int, list[str]]] = []

  def build(self, skipped: collections.Counter, entity_types, relation_types) -> Document:
    if self.title is None or self.abstract is None:
      missing = "title (|t|)" if self.title is None else "abstract (|a|)"
      raise DataError(f"{where(self.source, self.line, self.pmid)}: document has no {missing} "
                      "line (truncated file?)")
    text = self.title + " " + self.abstract if self.abstract else self.title
    entities, by_concept = [], collections.defaultdict(list)
    mention_parts: dict[str, tuple[str, ...]] = {}
    for lineno, f in self.mentions:
      here = where(self.source, lineno, self.pmid)
      try:
        start, end = int(f[1]), int(f[2])
      except ValueError:
        raise DataError(f"{here}: start/end {f[1]!r}/{f[2]!r} are not integers") from None
      if not 0 <= start < end <= len(text):
        raise DataError(f"{here}: offsets {start}-{end} outside the text (length {len(text)})")
      if text[start:end] != f[3]:
        raise DataError(f"{here}: mention {f[3]!r} differs from the text at {start}-{end} "
                        f"{text[start:end]!r}")
      if entity_types is not None and f[4] not in entity_types:
        raise DataError(f"{here}: unknown entity type {f[4]!r}")
      concept = f[5].strip() if len(f) > 5 else ""
      if concept == NO_CONCEPT:
        concept = ""
        skipped["mentions without a concept id (-1; kept as entities, not a skip)"] += 1
      ent = Entity(id=f"T{len(entities) + 1}", start=start, end=end, type=f[4], text=f[3],
                   concept=concept)
      entities.append(ent)
      if len(f) > 6 and f[6].strip():
        parts = tuple(f[6].split("|"))
        mention_parts[ent.id] = parts
        if len(parts) != len(ent.concept_ids):
          skipped["composite mentions whose part texts and concept ids differ in number "
                  "(ids kept)"] += 1
      for c in ent.concept_keys:
        by_concept[c].append(ent.id)
    relations, novelty, relation_concepts = [], {}, {}
    for n, (lineno, f) in enumerate(self.relations, start=1):
      here = where(self.source, lineno, self.pmid)
      rel_type, id1, id2 = f[1], f[2], f[3]
      if relation_types is not None and rel_type not in relation_types:
        raise DataError(f"{here}: unknown relation type {rel_type!r}")
      for c in (id1, id2):
        if c.strip() == NO_CONCEPT:
          raise DataError(f"{here}: relation argument {c!r} marks an unnormalised mention, "
                          "which has no concept id to relate")
        if c not in by_concept:
          raise DataError(f"{here}: relation argument {c!r} is not the concept id of any mention")
      rel_id = f"R{n}"
      relation_concepts[rel_id] = (id1, id2)
      if len(f) > 4:
        novelty[rel_id] = f[4]
      pairs = [(h, t) for h in by_concept[id1] for t in by_concept[id2] if h != t]
      if not pairs:
        skipped["relation whose only mentions coincide"] += 1
      relations.extend(Relation(h, t, rel_type, rel_id) for h, t in pairs)
    doc = Document(id=self.pmid, text=text, entities=tuple(entities), relations=tuple(relations),
                   source=self.source, line=self.line,
                   meta={"pmid": self.pmid, "title_length": len(self.title),
                         "concept_relations": len(self.relations), "novelty": novelty,
                         "relation_concepts": relation_concepts,
                         **({"mention_parts": mention_parts} if mention_parts else {})})
    validate_document(doc)
    return doc


def read_pubtator(path: str | os.PathLike, entity_types: Iterable[str] | None = None,
                  relation_types: Iterable[str] | None = None
                  ) -> tuple[list[Document], collections.Counter]:
  """Reads every document of a PubTator file, checking each line; errors name file:line."""
  path = Path(path)
  source = str(path)
  entity_types = None if entity_types is None else frozenset(entity_types)
  relation_types = None if relation_types is None else frozenset(relation_types)
  skipped: collections.Counter = collections.Counter()
  docs: list[Document] = []
  seen: dict[str, int] = {}
  current: _Builder | None = None

  def finish():
    if current is not None:
      if current.pmid in seen:
        raise DataError(f"{where(source, current.line, current.pmid)}: PMID already used by the "
                        f"document at line {seen[current.pmid]}")
      seen[current.pmid] = current.line
      docs.append(current.build(skipped, entity_types, relation_types))

  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{source}: cannot read PubTator file ({e})") from None
  for lineno, raw in enumerate(lines, start=1):
    line = raw.rstrip("\r")
    if not line.strip():
      finish()
      current = None
      continue
    header = _HEADER.match(line)
    if header and "\t" not in line.split("|", 2)[0]:
      pmid, kind, body = header.groups()
      if kind == "t":
        finish()
        current = _Builder(pmid, source, lineno)
        current.title = body
        continue
      if current is None or current.pmid != pmid:
        raise DataError(f"{where(source, lineno, pmid)}: abstract line without its title line")
      current.abstract = body
      continue
    fields = line.split("\t")
    if current is None:
      raise DataError(f"{where(source, lineno)}: annotation line before any |t| title line")
    if fields[0] != current.pmid:
      raise DataError(f"{where(source, lineno, current.pmid)}: line belongs to PMID "
                      f"{fields[0]!r}, expected {current.pmid!r} (missing blank line?)")
    if current.abstract is None:
      raise DataError(f"{where(source, lineno, current.pmid)}: annotation before the |a| line")
    if len(fields) >= 5 and fields[1].isdigit() and fields[2].isdigit():
      current.mentions.append((lineno, fields))
    elif len(fields) in (4, 5) and not fields[1].isdigit():
      current.relations.append((lineno, fields))
    else:
      raise DataError(f"{where(source, lineno, current.pmid)}: expected a mention line "
                      "(PMID start end text type [ids]) or a relation line "
                      f"(PMID type id1 id2 [novelty]), got {len(fields)} fields: {line[:80]!r}")
  finish()
  if not docs:
    raise DataError(f"{source}: no PubTator documents found")
  return docs, skipped


def load_biored(root: str | os.PathLike, split: str) -> Corpus:
  if split not in BIORED_SPLITS:
    raise DataError(f"BioRED split must be one of {sorted(BIORED_SPLITS)}, got {split!r}")
  docs, skipped = read_pubtator(Path(root) / BIORED_SPLITS[split], BIORED_ENTITY_TYPES,
                                BIORED_RELATION_TYPES)
  return Corpus("biored", split, docs, skipped)


def concept_relation_count(corpus: Corpus) -> int:
  return sum(int(d.meta.get("concept_relations", 0)) for d in corpus.documents)
