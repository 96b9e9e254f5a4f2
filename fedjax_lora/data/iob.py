"""Token-per-line IOB reader (NCBI-disease, E3C preprocessed clinical entities).

A file is `token<sep>tag` lines with a blank line between sentences; NCBI uses a TAB,
the E3C files a single space. Each sentence becomes one Document whose text is the
tokens joined by single spaces, which is exactly the `{space_join_tokens}` input the
NER prompt uses, so offsets need no re-alignment later. These files carry no document
ids or boundaries, hence one Document per sentence.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterable

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, where
from fedjax_lora.data.records import validate_document

IOB1_REPAIR = "I- without B- (IOB1 repair)"

NCBI_ENTITY_TYPES = ("Disease",)
NCBI_SPLITS = {"train": "train.tsv", "dev": "devel.tsv", "devel": "devel.tsv",
               "test": "test.tsv"}

E3C_IOB_ENTITY_TYPES = ("ety",)
_E3C_IOB_DIR = Path("preprocessed_data", "clinical_entities")
E3C_IOB_SPLITS = {
    "train": _E3C_IOB_DIR / "layer1" / "English" / "train.txt",
    "test": _E3C_IOB_DIR / "layer1" / "English" / "test.txt",
    # All 171 layer-2 documents (dictionary-matched silver), the 19 validated ones
    # included: the file has no document boundaries to drop them by.
    "silver": _E3C_IOB_DIR / "layer2" / "English" / "text.txt",
}


def parse_tag(tag: str) -> tuple[str, str]:
  """`O` -> ("O", ""), `B-X`/`I-X` -> ("B"/"I", "X"); anything else raises ValueError."""
  if tag == "O":
    return "O", ""
  prefix, sep, label = tag.partition("-")
  if prefix not in ("B", "I") or not sep or not label:
    raise ValueError(f"unknown tag {tag!r} (expected O, B-<type> or I-<type>)")
  return prefix, label


class TaggedSentence:
  """Tokens and open/closed mentions of the sentence being read."""

  def __init__(self, line: int):
    self.line = line
    self.tokens: list[str] = []
    self.spans: list[list] = []  # [type, first token, last token + 1]
    self.open = False

  def add(self, token: str, prefix: str, label: str, continues: bool) -> None:
    i = len(self.tokens)
    self.tokens.append(token)
    if prefix == "O":
      self.open = False
    elif continues:
      self.spans[-1][2] = i + 1
    else:
      self.spans.append([label, i, i + 1])
      self.open = True

  def current_type(self) -> str | None:
    return self.spans[-1][0] if self.open else None

  def build(self, doc_id: str, source: str) -> Document:
    starts, pos = [], 0
    for tok in self.tokens:
      starts.append(pos)
      pos += len(tok) + 1
    text = " ".join(self.tokens)
    entities = []
    for n, (label, a, b) in enumerate(self.spans, 1):
      start, end = starts[a], starts[b - 1] + len(self.tokens[b - 1])
      entities.append(Entity(f"T{n}", start, end, label, text[start:end]))
    return Document(doc_id, text, tuple(entities), source=source, line=self.line,
                    meta={"tokens": len(self.tokens)})


def _detect_sep(lines: list[str]) -> str:
  for line in lines:
    if line.strip():
      return "\t" if "\t" in line else " "
  return "\t"


def read_iob(path: str | os.PathLike, column_sep: str | None = None,
             doc_prefix: str | None = None, label_set: Iterable[str] | None = None,
             repair_iob1: bool = True) -> tuple[list[Document], collections.Counter]:
  """Reads one IOB file: one Document per sentence, ids `<prefix>:<sentence index>`.

  `column_sep=None` takes TAB if the first token line has one, else a space. An I- tag
  that does not continue an entity of its type starts a new one (counted under
  IOB1_REPAIR) unless `repair_iob1=False`, where it is an error.
  """
  path = Path(path)
  source = str(path)
  prefix = path.stem if doc_prefix is None else doc_prefix
  labels = None if label_set is None else frozenset(label_set)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{where(source)}: cannot read: {e}") from e
  try:
    content = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{where(source, line)}: not UTF-8 text ({e.reason})") from e
  # Only "\n" ends a line: str.splitlines() would also cut at U+2028, \x85, \x0c ...
  lines = [line.rstrip("\r") for line in content.split("\n")]
  sep = _detect_sep(lines) if column_sep is None else column_sep
  skipped: collections.Counter = collections.Counter()
  docs: list[Document] = []
  sent: TaggedSentence | None = None

  def finish():
    if sent is not None:
      doc = sent.build(f"{prefix}:{len(docs)}", source)
      validate_document(doc, labels)
      docs.append(doc)

  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      finish()
      sent = None
      continue
    fields = line.split(sep)
    if len(fields) != 2 or not fields[0] or not fields[1]:
      raise DataError(f"{where(source, lineno)}: expected `token{sep!r}tag`, got {line!r} "
                      f"({len(fields)} column(s))")
    token, tag = fields
    try:
      kind, label = parse_tag(tag.strip())
    except ValueError as e:
      raise DataError(f"{where(source, lineno)}: {e}") from None
    if labels is not None and label and label not in labels:
      raise DataError(f"{where(source, lineno)}: unknown entity type {label!r} in tag {tag!r}; "
                      f"known: {', '.join(sorted(labels))}")
    if sent is None:
      sent = TaggedSentence(lineno)
    continues = kind == "I" and sent.current_type() == label
    if kind == "I" and not continues:
      if not repair_iob1:
        raise DataError(f"{where(source, lineno)}: {tag!r} does not continue an entity of type "
                        f"{label!r} (IOB1-style tag; pass repair_iob1=True to convert it)")
      skipped[IOB1_REPAIR] += 1
    sent.add(token, kind, label, continues)
  finish()
  if not docs:
    raise DataError(f"{where(source)}: no sentences found (empty file?)")
  return docs, skipped


def load_ncbi_disease(root: str | os.PathLike, split: str) -> Corpus:
  """NCBI-disease IOB (`train`, `dev`/`devel`, `test`): one Document per sentence."""
  if split not in NCBI_SPLITS:
    raise DataError(f"NCBI-disease split must be one of {sorted(NCBI_SPLITS)}, got {split!r}")
  name = NCBI_SPLITS[split]
  docs, skipped = read_iob(Path(root) / name, "\t", f"ncbi_disease-{Path(name).stem}",
                           NCBI_ENTITY_TYPES)
  return Corpus("ncbi_disease", split, docs, skipped)


def load_e3c_iob(root: str | os.PathLike, split: str) -> Corpus:
  """E3C English preprocessed IOB: layer-1 `train`/`test` gold, layer-2 `silver`.

  These files drop discontinuous and nested CLINENTITY mentions (layer 1: 1,024 in the
  XMI, 953 here) and use the single tag type `ety`.
  """
  if split not in E3C_IOB_SPLITS:
    raise DataError(f"E3C IOB split must be one of {sorted(E3C_IOB_SPLITS)}, got {split!r}")
  docs, skipped = read_iob(Path(root) / E3C_IOB_SPLITS[split], " ", f"e3c_iob-{split}",
                           E3C_IOB_ENTITY_TYPES)
  return Corpus("e3c_iob", split, docs, skipped)
