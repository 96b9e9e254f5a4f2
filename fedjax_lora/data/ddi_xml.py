"""DDI corpus 2013 reader (one XML file per DrugBank label or MedLine abstract).

Each `<sentence text=...>` becomes one Document (id = sentence id), because the corpus
annotates and pairs entities sentence by sentence. `<entity charOffset="a-b;c-d">` ends
are INCLUSIVE and several `;`-separated pieces mark a discontinuous mention; they become
exclusive fragments. Positive `<pair ddi="true" type=...>` become Relations (e1 -> e2);
negative pairs are only counted, since pairs are listed exhaustively and any unlinked pair
of a sentence is a negative anyway.

The XML is parsed with expat (ElementTree's own parser) so every error can name the file
and line: ElementTree does not report line numbers of elements.

Corpus quirks handled here, each counted in `Corpus.skipped`:
* 71 training sentences have empty text: skipped (they hold no entities or pairs).
* one training pair has ddi="true" but no type: dropped.
* one training entity's offsets are one character off ("(R)-warfarin" in Eszopiclone):
  repaired by a +-1 shift when, and only when, the shifted span matches the entity text.
* the `text` of a discontinuous entity joins pieces without the space our convention puts
  between fragments ("alpha-adrenergic"), so pieces are compared ignoring whitespace.

Train has no official dev split: `is_dev_document` carves ~10% of Train documents by a
hash of the document id, so the split is fixed without storing anything.
"""

from __future__ import annotations

import collections
import hashlib
import os
from pathlib import Path
from xml.parsers import expat

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

DDI_ENTITY_TYPES = ("drug", "brand", "group", "drug_n")
DDI_RELATION_TYPES = ("mechanism", "effect", "advise", "int")
DDI_SPLITS = ("train", "dev", "test", "ner_test")
SUBCORPORA = ("DrugBank", "MedLine")
_SPLIT_DIRS = {"train": ("Train",), "dev": ("Train",),
               "test": ("Test", "Test for DDI Extraction task"),
               "ner_test": ("Test", "Test for DrugNER task")}
_CHILDREN = {None: ("document",), "document": ("sentence",), "sentence": ("entity", "pair")}


def is_dev_document(document_id: str) -> bool:
  """True for the ~10% of Train documents carved out as dev (SHA-256 of the id mod 10 == 0)."""
  return int(hashlib.sha256(document_id.encode("utf-8")).hexdigest(), 16) % 10 == 0


class _Sentence:
  def __init__(self, attrs: dict, line: int):
    self.attrs, self.line = attrs, line
    self.entities: list[tuple[dict, int]] = []
    self.pairs: list[tuple[dict, int]] = []


def _parse(path: Path) -> tuple[dict, int, list[_Sentence]]:
  """Returns (document attributes, its line, sentences); DataError with file:line if invalid."""
  source = str(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"{source}: cannot read DDI XML file ({e})") from None
  parser = expat.ParserCreate()
  doc: list = []
  sentences: list[_Sentence] = []
  stack: list[str] = []

  def start(name: str, attrs: dict):
    line = parser.CurrentLineNumber
    parent = stack[-1] if stack else None
    if name not in _CHILDREN.get(parent, ()):
      raise DataError(f"{where(source, line)}: unexpected element <{name}> inside "
                      f"<{parent or 'top level'}>")
    stack.append(name)
    if name == "document":
      doc.append((attrs, line))
    elif name == "sentence":
      sentences.append(_Sentence(attrs, line))
    elif name == "entity":
      sentences[-1].entities.append((attrs, line))
    else:
      sentences[-1].pairs.append((attrs, line))

  def end(name: str):
    stack.pop()

  def text(data: str):
    if data.strip():
      raise DataError(f"{where(source, parser.CurrentLineNumber)}: unexpected text "
                      f"{data.strip()[:40]!r} inside <{stack[-1] if stack else 'top level'}>")

  parser.StartElementHandler = start
  parser.EndElementHandler = end
  parser.CharacterDataHandler = text
  try:
    parser.Parse(data, True)
  except expat.ExpatError as e:
    raise DataError(f"{where(source, e.lineno)}: invalid XML ({expat.ErrorString(e.code)}, "
                    f"column {e.offset + 1})") from None
  if not doc:
    raise DataError(f"{source}: no <document> element")
  return doc[0][0], doc[0][1], sentences


def _required(attrs: dict, key: str, here: str) -> str:
  if key not in attrs:
    raise DataError(f"{here}: missing attribute {key!r}")
  return attrs[key]


def _fragments(offsets: str, here: str) -> list[tuple[int, int]]:
  """'a-b;c-d' with inclusive ends -> [(a, b+1), (c, d+1)]."""
  pieces = []
  for part in offsets.split(";"):
    bounds = part.strip().split("-")
    if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
      raise DataError(f"{here}: charOffset {offsets!r} is not 'start-end[;start-end...]'")
    pieces.append((int(bounds[0]), int(bounds[1]) + 1))
  if any(b <= a for a, b in pieces) or any(p[1] > q[0] for p, q in zip(pieces, pieces[1:])):
    raise DataError(f"{here}: charOffset {offsets!r} has empty, unordered or overlapping pieces")
  return pieces


def _squeeze(s: str) -> str:
  return "".join(s.split())


def _matches(text: str, pieces: list[tuple[int, int]], surface: str) -> bool:
  if any(not 0 <= a < b <= len(text) for a, b in pieces):
    return False
  if len(pieces) == 1:
    return text[pieces[0][0]:pieces[0][1]] == surface
  return _squeeze("".join(text[a:b] for a, b in pieces)) == _squeeze(surface)


def _entity(attrs: dict, line: int, text: str, source: str, sent_id: str,
            skipped: collections.Counter) -> Entity:
  here = where(source, line, sent_id)
  ent_id = _required(attrs, "id", here)
  here = f"{here}: entity {ent_id}"
  surface = _required(attrs, "text", here)
  pieces = _fragments(_required(attrs, "charOffset", here), here)
  if not _matches(text, pieces, surface):
    for shift in (1, -1):
      moved = [(a + shift, b + shift) for a, b in pieces]
      if _matches(text, moved, surface):
        skipped[f"entity offsets repaired (shifted by {shift:+d})"] += 1
        pieces = moved
        break
    else:
      got = " ".join(text[max(a, 0):b] for a, b in pieces)
      raise DataError(f"{here}: text {surface!r} differs from the sentence text at charOffset "
                      f"{attrs['charOffset']} ({got!r}; ends are inclusive) or is outside it "
                      f"(length {len(text)})")
  etype = _required(attrs, "type", here)
  if etype not in DDI_ENTITY_TYPES:
    raise DataError(f"{here}: unknown entity type {etype!r}; known: {', '.join(DDI_ENTITY_TYPES)}")
  joined = " ".join(text[a:b] for a, b in pieces)
  return Entity(id=ent_id, start=pieces[0][0], end=pieces[0][1], type=etype, text=joined,
                fragments=tuple(pieces) if len(pieces) > 1 else ())


def read_ddi_file(path: str | os.PathLike) -> tuple[list[Document], collections.Counter]:
  """Reads one DDI XML file: a Document per non-empty sentence, plus what was skipped."""
  _, docs, skipped = _read(Path(path))
  return docs, skipped


def _read(path: Path) -> tuple[str, list[Document], collections.Counter]:
  source = str(path)
  skipped: collections.Counter = collections.Counter()
  doc_attrs, doc_line, sentences = _parse(path)
  doc_id = _required(doc_attrs, "id", where(source, doc_line))
  subcorpus = next((s for s in SUBCORPORA if doc_id.startswith(f"DDI-{s}.")), None)
  if subcorpus is None:
    raise DataError(f"{where(source, doc_line, doc_id)}: document id should start with "
                    f"DDI-DrugBank. or DDI-MedLine.")
  meta_base = {"document": doc_id, "subcorpus": subcorpus}
  if subcorpus == "MedLine":
    meta_base["pmid"] = path.stem
  docs = []
  seen: set[str] = set()
  for sent in sentences:
    here = where(source, sent.line, doc_id)
    sent_id = _required(sent.attrs, "id", here)
    text = _required(sent.attrs, "text", here)
    if not sent_id.startswith(f"{doc_id}.s"):
      raise DataError(f"{where(source, sent.line, sent_id)}: sentence id does not belong to "
                      f"document {doc_id}")
    if sent_id in seen:
      raise DataError(f"{where(source, sent.line, sent_id)}: duplicate sentence id")
    seen.add(sent_id)
    if not text.strip():
      if sent.entities or sent.pairs:
        raise DataError(f"{where(source, sent.line, sent_id)}: empty sentence with annotations")
      skipped["sentence with empty text"] += 1
      continue
    entities = [_entity(a, line, text, source, sent_id, skipped) for a, line in sent.entities]
    known = {e.id for e in entities}
    relations = []
    for attrs, line in sent.pairs:
      here = where(source, line, sent_id)
      pair_id = _required(attrs, "id", here)
      here = f"{here}: pair {pair_id}"
      e1, e2 = _required(attrs, "e1", here), _required(attrs, "e2", here)
      for arg in (e1, e2):
        if arg not in known:
          raise DataError(f"{here}: argument {arg!r} is not an entity of this sentence")
      ddi = _required(attrs, "ddi", here)
      if ddi == "false":
        skipped["negative pairs"] += 1
      elif ddi != "true":
        raise DataError(f"{here}: ddi={ddi!r}, expected 'true' or 'false'")
      elif not attrs.get("type"):
        skipped["positive pair without type"] += 1
      elif attrs["type"] not in DDI_RELATION_TYPES:
        raise DataError(f"{here}: unknown interaction type {attrs['type']!r}; known: "
                        f"{', '.join(DDI_RELATION_TYPES)}")
      else:
        relations.append(Relation(e1, e2, attrs["type"], pair_id))
    doc = Document(id=sent_id, text=text, entities=tuple(entities), relations=tuple(relations),
                   source=source, line=sent.line, meta=dict(meta_base))
    validate_document(doc, DDI_ENTITY_TYPES, DDI_RELATION_TYPES)
    docs.append(doc)
  return doc_id, docs, skipped


def _split_files(root: Path, split: str) -> list[Path]:
  if split not in DDI_SPLITS:
    raise DataError(f"DDI split must be one of {list(DDI_SPLITS)}, got {split!r}")
  base = root / "DDICorpus"
  base = base.joinpath(*_SPLIT_DIRS[split])
  files = []
  for sub in SUBCORPORA:
    folder = base / sub
    if not folder.is_dir():
      raise DataError(f"{folder}: DDI folder not found (expected under {root})")
    files.extend(sorted(folder.glob("*.xml")))
  return files


def _read_split(root: Path, split: str, carve: bool = True
                ) -> tuple[list[Document], collections.Counter, list[str]]:
  """Documents, skip counts and document ids of one split; "train"/"dev" carve Train
  (carve=False: all of Train)."""
  docs, skipped, doc_ids = [], collections.Counter(), []
  seen: dict[str, Path] = {}
  for f in _split_files(root, split):
    doc_id, part, counts = _read(f)
    if doc_id in seen:
      raise DataError(f"{f}: document id {doc_id} already used by {seen[doc_id]}")
    seen[doc_id] = f
    if carve and split in ("train", "dev") and is_dev_document(doc_id) != (split == "dev"):
      continue
    skipped.update(counts)
    doc_ids.append(doc_id)
    docs.extend(part)
  return docs, skipped, doc_ids


def load_ddi(root: str | os.PathLike, split: str) -> Corpus:
  """Split "train"/"dev" (carved from Train by document), "test" (DDI extraction), "ner_test"."""
  docs, skipped, _ = _read_split(Path(root), split)
  if not docs:
    raise DataError(f"{root}: no DDI sentences found for split {split!r}")
  return Corpus("ddi", split, docs, skipped)


def ddi_split_ids(root: str | os.PathLike) -> dict[str, list[str]]:
  """Document ids of the carved "train" and "dev" splits, to store beside processed data."""
  ids = _read_split(Path(root), "train", carve=False)[2]
  return {"train": [i for i in ids if not is_dev_document(i)],
          "dev": [i for i in ids if is_dev_document(i)]}
