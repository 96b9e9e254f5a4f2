"""brat standoff reader (`.txt` + `.ann`) and the Chia corpus loader.

Offsets in `.ann` files count every character of the `.txt` file as stored, `\\r` included.
The reader normalises CRLF line ends to `\\n` (so no `\\r` reaches tokenizers) and maps
every offset onto the normalised text; spans that an annotator dragged over the line end
(`"prostate cancer\\r"`) thereby lose the `\\r` and match their text field again.

Annotation lines:
* `T` text-bound mentions, discontinuous ones as `start end;start end`. Fragments keep
  file order (Chia writes the head first, e.g. "reactions allergic"); the text field must
  equal the fragment texts joined by single spaces.
* `R` binary relations `Type Arg1:X Arg2:Y` -> Relation(head=X, tail=Y).
* `*` groups `Type A B C` (Chia's OR) are expanded into a CHAIN of pairwise relations
  between consecutive members (A-B, B-C): n-1 edges whose connected component is the group,
  instead of n(n-1)/2 redundant pairs. Members whose entity is dropped leave the chain
  first, so the remaining members stay connected. The original groups are kept in
  `Document.meta["groups"]` and counted under "<Type> groups read (* lines, not a skip)".
* `E` events `Type:Trigger Role:Arg ...` -> one relation trigger -> argument per role,
  typed by the role. Arguments (and R/`*` arguments) naming an event mean its trigger.
* `N` normalisations fill `Entity.concept` (first one wins); `A`/`M` attributes and `#`
  notes are counted as ignored, never dropped silently.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

_ID = re.compile(r"^[TREAMN#*]\S*$")
_ROLE_ARG = re.compile(r"^([^:\s]+):(\S+)$")


def _read_text(path: Path) -> str:
  try:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r, as brat does
      return f.read()
  except OSError as e:
    raise DataError(f"{where(path)}: cannot read ({e.strerror or e})") from e
  except UnicodeDecodeError as e:
    raise DataError(f"{where(path)}: not UTF-8 (byte {e.start})") from e


def normalise_newlines(raw: str) -> tuple[str, list[int]]:
  """Returns (text with CRLF -> LF, positions of the removed `\\r`s in `raw`)."""
  removed = [m.start() for m in re.finditer("\r\n", raw)]
  return (raw.replace("\r\n", "\n") if removed else raw), removed


def _map(offset: int, removed: list[int]) -> int:
  return offset - bisect.bisect_left(removed, offset)


class _Ann:
  """The parsed lines of one `.ann` file, before dropping and validation."""

  def __init__(self):
    self.entities: dict[str, tuple[int, str, list[tuple[int, int]], str]] = {}
    self.relations: list[tuple[int, str, str, str, str]] = []  # line, id, type, head, tail
    self.groups: list[tuple[int, str, list[str]]] = []  # line, type, members
    self.events: dict[str, tuple[int, str, str, list[tuple[str, str]]]] = {}
    self.norms: list[tuple[int, str, str]] = []  # line, target, concept
    self.ids: set[str] = set()


def _parse_ann(ann_path: Path, counts: collections.Counter) -> _Ann:
  ann, no = _Ann(), 0
  raw = _read_text(ann_path)

  def bad(msg: str) -> DataError:
    return DataError(f"{where(ann_path, no)}: {msg}")

  for no, line in enumerate(raw.split("\n"), 1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")
    ident = fields[0]
    if not _ID.match(ident):
      raise bad(f"unknown annotation line {line[:60]!r} (expected T/R/E/A/M/N/#/* "
                "id, tab, ...)")
    if len(fields) < 2:
      raise bad(f"truncated line {line!r} (no tab-separated annotation)")
    if ident != "*" and not ident.startswith("#"):
      if ident in ann.ids:
        raise bad(f"duplicate id {ident!r}")
      ann.ids.add(ident)
    kind, body = ident[0], fields[1].split()
    if kind == "T":
      if len(fields) < 3 or len(body) < 3:
        raise bad(f"malformed text-bound line {line!r} (want "
                  "'T1<TAB>Type start end[;start end]<TAB>text')")
      frags = []
      for piece in fields[1].split(" ", 1)[1].split(";"):
        se = piece.split()
        if len(se) != 2 or not all(x.isdigit() for x in se):
          raise bad(f"bad offsets {piece!r} in {line!r}")
        frags.append((int(se[0]), int(se[1])))
      ann.entities[ident] = (no, body[0], frags, "\t".join(fields[2:]))
    elif kind == "R":
      args = [_ROLE_ARG.match(a) for a in body[1:]]
      if len(body) != 3 or not all(args):
        raise bad(f"malformed relation line {line!r} (want "
                  "'R1<TAB>Type Arg1:T1 Arg2:T2')")
      ann.relations.append((no, ident, body[0], args[0].group(2), args[1].group(2)))
    elif kind == "*":
      if len(body) < 3:
        raise bad(f"malformed group line {line!r} (want '*<TAB>Type id id ...')")
      ann.groups.append((no, body[0], body[1:]))
    elif kind == "E":
      parts = [_ROLE_ARG.match(a) for a in body]
      if not body or not all(parts):
        raise bad(f"malformed event line {line!r} (want "
                  "'E1<TAB>Type:T1 Role:T2 ...')")
      etype, trigger = parts[0].groups()
      ann.events[ident] = (no, etype, trigger, [p.groups() for p in parts[1:]])
    elif kind in "AM":
      counts["attribute lines ignored"] += 1
    elif kind == "#":
      counts["note lines ignored"] += 1
    elif kind == "N":
      if len(body) < 3:
        raise bad(f"malformed normalization line {line!r} (want "
                  "'N1<TAB>Reference T1 DB:ID')")
      ann.norms.append((no, body[1], body[2]))
  return ann


def read_brat(txt_path: str | os.PathLike, ann_path: str | os.PathLike,
              doc_id: str | None = None, entity_types: Iterable[str] | None = None,
              relation_types: Iterable[str] | None = None,
              drop_entity_types: Iterable[str] = (), drop_relation_types: Iterable[str] = (),
              bad_spans: Mapping[str, str] | None = None,
              ) -> tuple[Document, collections.Counter]:
  """Reads one brat pair into a validated Document plus a Counter of what was left out.

  `entity_types`/`relation_types` (if given) are the labels to keep; any label in neither
  them nor the drop lists is an error. Dropped entities take their relations with them
  (counted "relation <T> with a dropped argument"). `bad_spans` maps entity ids of known
  annotation errors to a reason: they are skipped (and counted) instead of failing the span
  check, and must exist. Exact duplicate relations and self-relations are counted and
  removed. Errors raise DataError naming the .ann file and line.
  """
  txt_path, ann_path = Path(txt_path), Path(ann_path)
  doc_id = doc_id or ann_path.stem
  counts: collections.Counter = collections.Counter()
  keep_e = None if entity_types is None else frozenset(entity_types)
  keep_r = None if relation_types is None else frozenset(relation_types)
  drop_e, drop_r = frozenset(drop_entity_types), frozenset(drop_relation_types)
  bad_spans = dict(bad_spans or {})
  raw = _read_text(txt_path)
  text, removed = normalise_newlines(raw)
  ann = _parse_ann(ann_path, counts)

  def bad(no: int | None, msg: str) -> DataError:
    return DataError(f"{where(ann_path, no, doc_id)}: {msg}")

  def check_label(label: str, keep, drop, what: str, no: int) -> bool:
    """True to keep; False to drop (counted by the caller); DataError if unknown."""
    if label in drop:
      return False
    if keep is not None and label not in keep:
      raise bad(no, f"unknown {what} type {label!r}; known: "
                    f"{', '.join(sorted(keep))} (dropped: {', '.join(sorted(drop)) or '-'})")
    return True

  for ident in bad_spans:
    if ident not in ann.entities:
      raise bad(None, f"entity {ident!r} listed as a bad span "
                      "is not in the file")

  entities: dict[str, Entity] = {}
  dropped: set[str] = set()
  for ident, (no, etype, frags, field) in ann.entities.items():
    keep = check_label(etype, keep_e, drop_e, "entity", no)
    for s, e in frags:
      if not 0 <= s < e <= len(raw):
        raise bad(no, f"entity {ident} offsets {s}-{e} outside the text of "
                      f"{txt_path.name} (length {len(raw)}) or empty")
    pieces = tuple((_map(s, removed), _map(e, removed)) for s, e in frags)
    got = " ".join(text[s:e] for s, e in pieces)
    if ident in bad_spans:
      counts[f"entity with a bad span ({bad_spans[ident]})"] += 1
      dropped.add(ident)
      continue
    if got != field:
      raise bad(no, f"entity {ident} text {field!r} differs from the text at its "
                    f"offsets {got!r} in {txt_path.name}")
    if not keep:
      counts[f"entity label {etype}"] += 1
      dropped.add(ident)
      continue
    entities[ident] = Entity(id=ident, start=pieces[0][0], end=pieces[0][1], type=etype,
                             text=got, fragments=pieces if len(pieces) > 1 else ())

  for no, target, concept in ann.norms:
    if target not in ann.ids:
      raise bad(no, f"normalization of unknown id {target!r}")
    e = entities.get(target)
    if e is None or e.concept:
      counts["normalization lines ignored (dropped, non-entity or repeated target)"] += 1
    else:
      entities[target] = dataclasses.replace(e, concept=concept)

  def resolve(arg: str, no: int) -> str:
    """An argument's entity id (an event stands for its trigger)."""
    seen = set()
    while arg in ann.events and arg not in seen:
      seen.add(arg)
      arg = ann.events[arg][2]
    if arg not in ann.entities:
      raise bad(no, f"argument {arg!r} is not an entity "
                    "(T) or event (E) of this file")
    return arg

  relations: list[Relation] = []
  seen_rel: set[tuple[str, str, str]] = set()

  def add(rid: str, rtype: str, head: str, tail: str, no: int) -> None:
    head, tail = resolve(head, no), resolve(tail, no)
    if not check_label(rtype, keep_r, drop_r, "relation", no):
      counts[f"relation label {rtype}"] += 1
    elif head in dropped or tail in dropped:
      counts[f"relation {rtype} with a dropped argument"] += 1
    elif head == tail:
      counts[f"self-relation {rtype}"] += 1
    elif (rtype, head, tail) in seen_rel:
      counts[f"duplicate relation {rtype}"] += 1
    else:
      seen_rel.add((rtype, head, tail))
      relations.append(Relation(head=head, tail=tail, type=rtype, id=rid))

  for no, rid, rtype, head, tail in ann.relations:
    add(rid, rtype, head, tail, no)
  for eid, (no, etype, trigger, roles) in ann.events.items():
    resolve(trigger, no)
    for role, arg in roles:
      add(f"{eid}.{role}", role, trigger, arg, no)
  groups = []
  for k, (no, gtype, members) in enumerate(ann.groups, 1):
    counts[f"{gtype} groups read (* lines, not a skip)"] += 1
    ids = [resolve(m, no) for m in members]
    if not check_label(gtype, keep_r, drop_r, "relation", no):
      counts[f"relation label {gtype} (* groups)"] += 1
      continue
    kept = []
    for m in ids:
      if m in dropped:
        counts[f"{gtype} group member dropped with its entity"] += 1
      elif m in kept:
        counts[f"{gtype} group member repeated"] += 1
      else:
        kept.append(m)
    if len(kept) < 2:
      counts[f"{gtype} group left with fewer than 2 members"] += 1
      continue
    groups.append((gtype, tuple(kept)))
    for i in range(len(kept) - 1):
      add(f"*{k}.{i + 1}", gtype, kept[i], kept[i + 1], no)

  meta: dict[str, object] = {}
  if groups:
    meta["groups"] = tuple(groups)
  if removed:
    meta["crlf"] = True  # offsets refer to the text with CRLF -> LF
  doc = Document(id=doc_id, text=text, entities=tuple(entities.values()),
                 relations=tuple(relations), source=str(ann_path), meta=meta)
  validate_document(doc, keep_e, keep_r)
  return doc, counts


def read_brat_folder(folder: str | os.PathLike, entity_types: Iterable[str] | None = None,
                     relation_types: Iterable[str] | None = None,
                     ) -> tuple[list[Document], collections.Counter]:
  """Every `.txt`/`.ann` pair under `folder` (subfolders too), in path order.

  A document's id is its path below `folder` without the suffix (`notes/0001`). Each
  `.ann` needs its `.txt` and each `.txt` its `.ann` (an unannotated document has an empty
  `.ann`, as brat writes it); brat's `.conf` files and anything else are ignored.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"{where(folder)}: brat folder not found")
  paths = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".ann") and p.is_file())
  for path in paths:
    other = path.with_suffix(".ann" if path.suffix == ".txt" else ".txt")
    if not other.is_file():
      raise DataError(f"{where(path)}: {other.name} is missing (brat keeps each document as "
                      "a .txt with its .ann; an unannotated document needs an empty .ann)")
  docs, skipped = [], collections.Counter()
  for ann in (p for p in paths if p.suffix == ".ann"):
    doc_id = ann.relative_to(folder).with_suffix("").as_posix()
    doc, counts = read_brat(ann.with_suffix(".txt"), ann, doc_id, entity_types, relation_types)
    docs.append(doc)
    skipped.update(counts)
  if not docs:
    raise DataError(f"{where(folder)}: no brat documents (.txt + .ann pairs) found")
  return docs, skipped


# ---------------------------------------------------------------------------------- Chia

CHIA_ENTITY_TYPES = ("Condition", "Qualifier", "Value", "Drug", "Procedure", "Temporal",
                     "Measurement", "Person", "Observation", "Reference_point", "Negation",
                     "Multiplier", "Mood", "Device", "Visit")
CHIA_RELATION_TYPES = ("Has_value", "AND", "Has_qualifier", "Has_temporal", "Subsumes",
                       "Has_index", "Has_negation", "Has_multiplier", "Has_mood", "multi",
                       "Has_context", "OR")
# Error labels, special categories (annotation.conf !ERROR plus labels only the data uses),
# markup (Line: a whole criterion line; Scope: only in the "with scope" variant) and one
# stray label (c-Requires_causality, once). None of them is an entity to extract.
CHIA_DROPPED_ENTITY_TYPES = (
    "Non-query-able", "Parsing_Error", "Non-representable", "Undefined_semantics",
    "Context_Error", "Grammar_Error", "Not_a_criteria",
    "Post-eligibility", "Informed_consent", "Subjective_judgement", "Pregnancy_considerations",
    "Competing_trial", "Intoxication_considerations",
    "Line", "Scope", "c-Requires_causality")
# Rare labels (causal 37, v-AND 4, NOT 4 groups) and annotation.conf types unused in the data.
CHIA_DROPPED_RELATION_TYPES = ("causal", "v-AND", "NOT", "v-OR", "h-OR")
# Annotation errors found in the release; everything else passes the strict span check.
CHIA_BAD_SPANS = {
    # Offsets run over the next criterion line(s); the text field holds the first line only.
    ("NCT02137369_inc", "T8"): "span crosses criterion lines",
    ("NCT02590822_inc", "T5"): "span crosses criterion lines",
    # Offsets cover "Demographic Surveillance Site", text field says "Person Surveillance Site".
    ("NCT03460002_inc", "T5"): "text field differs from the text",
}
CHIA_SPLITS = ("train", "dev", "test")
_CHIA_FILE = re.compile(r"^(NCT\d+)_(inc|exc)$")


def chia_split_of(nct_id: str) -> str:
  """Deterministic 80/10/10 trial split: SHA-256 of the id mod 10 -> 0-7 train, 8 dev, 9 test."""
  bucket = int(hashlib.sha256(nct_id.encode("utf-8")).hexdigest(), 16) % 10
  return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def _chia_files(root: Path) -> dict[str, dict[str, Path]]:
  """trial id -> {"inc"/"exc": .txt path}; each .txt needs its .ann and each trial both parts."""
  folder = Path(root) / "chia_without_scope"
  if not folder.is_dir():
    raise DataError(f"{where(folder)}: Chia folder not found")
  trials: dict[str, dict[str, Path]] = collections.defaultdict(dict)
  for path in sorted(folder.iterdir()):
    if path.suffix not in (".txt", ".ann"):
      continue
    m = _CHIA_FILE.match(path.stem)
    if not m:
      raise DataError(f"{where(path)}: unexpected file name (want NCT<id>_inc/_exc.txt/.ann)")
    other = path.with_suffix(".ann" if path.suffix == ".txt" else ".txt")
    if not other.exists():
      raise DataError(f"{where(path)}: {other.name} is missing")
    if path.suffix == ".txt":
      trials[m.group(1)][m.group(2)] = path
  for nct, parts in trials.items():
    if set(parts) != {"inc", "exc"}:
      raise DataError(f"{where(folder)}: trial {nct} has only {', '.join(parts)} criteria")
  return dict(trials)


def chia_trial_ids(root: Path) -> dict[str, list[str]]:
  """Sorted trial ids per split (train/dev/test), to store beside processed data."""
  out: dict[str, list[str]] = {s: [] for s in CHIA_SPLITS}
  for nct in sorted(_chia_files(root)):
    out[chia_split_of(nct)].append(nct)
  return out


def load_chia(root: Path, split: str = "all") -> Corpus:
  """Chia without scope, one Document per criteria file (meta: trial, section).

  `root` is the corpus folder (…/data/raw/chia). Dropped labels and the known bad spans
  are counted in `Corpus.skipped`, together with the expanded OR group count.
  """
  if split not in CHIA_SPLITS + ("all",):
    raise ValueError(f"split must be one of {CHIA_SPLITS + ('all',)}, got {split!r}")
  docs, skipped = [], collections.Counter()
  for nct, parts in sorted(_chia_files(root).items()):
    if split != "all" and chia_split_of(nct) != split:
      continue
    for section in ("inc", "exc"):
      txt = parts[section]
      doc_id = txt.stem
      bad = {e: why for (d, e), why in CHIA_BAD_SPANS.items() if d == doc_id}
      doc, counts = read_brat(txt, txt.with_suffix(".ann"), doc_id, CHIA_ENTITY_TYPES,
                              CHIA_RELATION_TYPES, CHIA_DROPPED_ENTITY_TYPES,
                              CHIA_DROPPED_RELATION_TYPES, bad_spans=bad)
      meta = {**doc.meta, "trial": nct, "section": section}
      docs.append(Document(id=doc.id, text=doc.text, entities=doc.entities,
                           relations=doc.relations, source=doc.source, meta=meta))
      skipped.update(counts)
  return Corpus(name="chia", split=split, documents=docs, skipped=skipped)
