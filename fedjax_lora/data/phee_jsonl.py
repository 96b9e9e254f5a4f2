"""PHEE reader: pharmacovigilance events in JSON lines, turned into entities and relations.

One line = one sentence: `{"id": "PMID_n", "context", "is_mult_event", "annotations": [
{"events": [...]}]}`. An event has `event_type` (Adverse_event or
Potential_therapeutic_event), a `Trigger`, a `Subject` {Age, Gender, Population, Race,
Disorder}, a `Treatment` {Drug, Dosage, Route, Freq, Duration, Time_elapsed, Disorder,
Combination}, an `Effect` and the attributes Severity / Speculated / Negated.

A span node is `{"text": [[...], ...], "start": [[...], ...], "entity_id": [...]}`: the
OUTER list holds separate mentions (one entity_id each, e.g. two drugs), the INNER list the
fragments of one mention (several = discontinuous, e.g. ["intravitreal", "injections"]).
Each fragment must equal `context[start:start + len(text)]`.

Conversion (why: flat NER + pairwise RE targets for the S1 site):
* entities: the arguments Drug, Effect, Disorder (Subject's and Treatment's), Dosage,
  Route, Freq, Duration, Time_elapsed, Age, Gender, Race, Population. Identical mentions
  (type and fragments) repeated across events are merged; ids T1.. follow text order.
* not entities, counted in `skipped`: Trigger spans, the composite Subject / Treatment
  spans (their arguments are kept), and the Severity / Speculated / Negated cue spans.
* relations, deduplicated, head = Drug: `causes` Drug -> Effect of an Adverse_event;
  `treats` Drug -> Treatment.Disorder. Treatment.Disorder is the indication, the disorder
  the drug is given for ("valproate for epilepsy"), in adverse and therapeutic events
  alike, so by default both give `treats` (treats_from="therapeutic" keeps only
  Potential_therapeutic_event, the narrower reading of data.md). Subject.Disorder is a
  condition of the patient (comorbidity), not linked. The Effect of a therapeutic event is
  the benefit ("improved"): no relation type, counted. `has_dosage` / `has_route` /
  `has_frequency` / `has_duration`: Drug -> value of the same Treatment, except when the
  Treatment has several drugs AND several values of that kind (the pairing is not
  annotated: counted, not guessed). `combined_with`: every pair of drugs of a Combination,
  head = the earlier mention.
* `Document.meta["events"]` counts the events by type (plus nested Combination events).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
from pathlib import Path

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

PHEE_ENTITY_TYPES = ("Drug", "Effect", "Disorder", "Dosage", "Route", "Freq", "Duration",
                     "Time_elapsed", "Age", "Gender", "Race", "Population")
PHEE_RELATION_TYPES = ("causes", "treats", "has_dosage", "has_route", "has_frequency",
                       "has_duration", "combined_with")
PHEE_EVENT_TYPES = ("Adverse_event", "Potential_therapeutic_event")
PHEE_SPLITS = ("train", "dev", "test")
SUBJECT_ARGS = ("Age", "Gender", "Population", "Race", "Disorder")
TREATMENT_ARGS = ("Drug", "Dosage", "Route", "Freq", "Duration", "Time_elapsed", "Disorder")
ATTRIBUTES = ("Severity", "Speculated", "Negated")
DRUG_ATTRIBUTE_RELATIONS = {"Dosage": "has_dosage", "Route": "has_route",
                            "Freq": "has_frequency", "Duration": "has_duration"}
_EVENT_KEYS = frozenset({"event_id", "event_type", "Trigger", "Subject", "Treatment",
                         "Effect", *ATTRIBUTES})
_COMBINATION_KEYS = frozenset({"event_id", "event_type", "Trigger", "Drug"})
_SPAN_KEYS = frozenset({"text", "start", "entity_id"})
_ID = re.compile(r"^(\d+)_\d+$")

Mention = tuple[tuple[int, int], ...]  # fragments, in text order


class _Sentence:
  """Collects the mentions and relation triples of one line, then assembles a Document."""

  def __init__(self, doc_id: str, context: str, here: str, skipped: collections.Counter,
               treats_from: str):
    self.doc_id, self.context, self.here = doc_id, context, here
    self.skipped, self.treats_from = skipped, treats_from
    self.entities: dict[tuple[str, Mention], int] = {}
    self.triples: set[tuple[tuple[str, Mention], tuple[str, Mention], str]] = set()
    self.events: collections.Counter = collections.Counter()

  def spans(self, node: object, label: str) -> list[Mention]:
    """Mentions of a span node, each fragment checked against the context."""
    here = f"{self.here}: {label}"
    if not isinstance(node, dict) or "text" not in node or "start" not in node:
      raise DataError(f"{here}: expected a span with 'text' and 'start' lists")
    texts, starts = node["text"], node["start"]
    if (not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts)
        or not texts):
      raise DataError(f"{here}: 'text' and 'start' must be non-empty lists of equal length")
    mentions = []
    for t, s in zip(texts, starts):
      if not isinstance(t, list) or not isinstance(s, list) or len(t) != len(s) or not t:
        raise DataError(f"{here}: mention text {t!r} and start {s!r} must be non-empty lists "
                        "of equal length (one item per fragment)")
      pieces = []
      for frag, begin in zip(t, s):
        if not isinstance(frag, str) or not frag or type(begin) is not int:
          raise DataError(f"{here}: fragment {frag!r} at {begin!r} is not a non-empty string "
                          "at an integer offset")
        end = begin + len(frag)
        if not 0 <= begin < end <= len(self.context):
          raise DataError(f"{here}: offsets {begin}-{end} of {frag!r} outside the text "
                          f"(length {len(self.context)})")
        if self.context[begin:end] != frag:
          raise DataError(f"{here}: span text {frag!r} differs from the text at {begin}-{end} "
                          f"{self.context[begin:end]!r}")
        pieces.append((begin, end))
      pieces.sort()
      if any(a[1] > b[0] for a, b in zip(pieces, pieces[1:])):
        raise DataError(f"{here}: fragments {pieces} overlap")
      mentions.append(tuple(pieces))
    return mentions

  def add(self, node: object, etype: str, label: str) -> list[tuple[str, Mention]]:
    keys = []
    for m in self.spans(node, label):
      key = (etype, m)
      if key in self.entities:
        self.skipped["duplicate mention merged (same type and offsets)"] += 1
      else:
        self.entities[key] = len(self.entities)
      keys.append(key)
    return keys

  def skip(self, node: object, label: str, reason: str):
    self.skipped[reason] += len(self.spans(node, label))

  def link(self, heads, tails, rel_type: str):
    for h, t in itertools.product(heads, tails):
      if h == t:
        self.skipped[f"{rel_type} between a mention and itself"] += 1
      else:
        self.triples.add((h, t, rel_type))

  def event(self, ev: object, n: int):
    label = f"event {n}"
    if not isinstance(ev, dict):
      raise DataError(f"{self.here}: {label} is not an object")
    label = f"event {ev.get('event_id', n)}"
    unknown = set(ev) - _EVENT_KEYS
    if unknown:
      raise DataError(f"{self.here}: {label}: unknown keys {sorted(unknown)}")
    kind = ev.get("event_type")
    if kind not in PHEE_EVENT_TYPES:
      raise DataError(f"{self.here}: {label}: unknown event_type {kind!r}; known: "
                      f"{', '.join(PHEE_EVENT_TYPES)}")
    self.events[kind] += 1
    if "Trigger" in ev:
      self.skip(ev["Trigger"], f"{label} Trigger", "Trigger span")
    for attr in ATTRIBUTES:
      if attr in ev:
        self.skip(ev[attr], f"{label} {attr}", f"{attr} cue span")
    effects = self.add(ev["Effect"], "Effect", f"{label} Effect") if "Effect" in ev else []
    subject = ev.get("Subject")
    if subject is not None:
      self.skip(subject, f"{label} Subject", "Subject span (composite; arguments kept)")
      self._arguments(subject, SUBJECT_ARGS, f"{label} Subject")
    treatment = ev.get("Treatment")
    args: dict[str, list] = {}
    if treatment is not None:
      self.skip(treatment, f"{label} Treatment", "Treatment span (composite; arguments kept)")
      args = self._arguments(treatment, TREATMENT_ARGS + ("Combination",), f"{label} Treatment")
    drugs = args.get("Drug", [])
    if not drugs:
      self.skipped["event without a Drug (no relations)"] += 1
      return
    if kind == "Adverse_event":
      self.link(drugs, effects, "causes")
    else:
      self.skipped["therapeutic-event Drug-Effect pair (no relation type)"] += (
          len(drugs) * len(effects))
    indications = args.get("Disorder", [])
    if kind == "Potential_therapeutic_event" or self.treats_from == "all":
      self.link(drugs, indications, "treats")
    else:
      self.skipped["adverse-event Drug-indication pair (treats_from=therapeutic)"] += (
          len(drugs) * len(indications))
    for attr, rel in DRUG_ATTRIBUTE_RELATIONS.items():
      values = args.get(attr, [])
      if len(drugs) > 1 and len(values) > 1:
        self.skipped[f"{rel} pair with several drugs and values (pairing not annotated)"] += (
            len(drugs) * len(values))
      else:
        self.link(drugs, values, rel)

  def _arguments(self, node: dict, names: tuple[str, ...], label: str) -> dict[str, list]:
    unknown = set(node) - _SPAN_KEYS - set(names)
    if unknown:
      raise DataError(f"{self.here}: {label}: unknown arguments {sorted(unknown)}")
    args = {}
    for name in names:
      if name not in node:
        continue
      if name == "Combination":
        self._combinations(node[name], f"{label} Combination")
      else:
        args[name] = self.add(node[name], name, f"{label} {name}")
    return args

  def _combinations(self, combos: object, label: str):
    if not isinstance(combos, list):
      raise DataError(f"{self.here}: {label}: expected a list of Combination events")
    for n, combo in enumerate(combos):
      if not isinstance(combo, dict) or combo.get("event_type") != "Combination":
        raise DataError(f"{self.here}: {label} {n}: expected an event of type Combination")
      unknown = set(combo) - _COMBINATION_KEYS
      if unknown:
        raise DataError(f"{self.here}: {label} {n}: unknown keys {sorted(unknown)}")
      self.events["Combination"] += 1
      if "Trigger" in combo:
        self.skip(combo["Trigger"], f"{label} Trigger", "Combination Trigger span")
      drugs = self.add(combo.get("Drug"), "Drug", f"{label} Drug")
      drugs = sorted(set(drugs), key=lambda k: (k[1], k[0]))
      if len(drugs) < 2:
        self.skipped["Combination with fewer than two distinct drugs"] += 1
      for i, head in enumerate(drugs):
        self.link([head], drugs[i + 1:], "combined_with")

  def document(self, source: str, line: int, meta: dict) -> Document:
    order = sorted(self.entities, key=lambda k: (k[1][0], k[1][-1], k[0], k[1]))
    ids = {key: f"T{i}" for i, key in enumerate(order, start=1)}
    entities = tuple(
        Entity(id=ids[key], start=key[1][0][0], end=key[1][0][1], type=key[0],
               text=" ".join(self.context[a:b] for a, b in key[1]),
               fragments=key[1] if len(key[1]) > 1 else ())
        for key in order)
    relations = sorted((ids[h], ids[t], r) for h, t, r in self.triples)
    relations = tuple(Relation(h, t, r, f"R{i}")
                      for i, (h, t, r) in enumerate(relations, start=1))
    meta = dict(meta, events=dict(sorted(self.events.items())))
    return Document(id=self.doc_id, text=self.context, entities=entities, relations=relations,
                    source=source, line=line, meta=meta)


def _parse_line(raw: str, source: str, lineno: int, skipped: collections.Counter,
                treats_from: str) -> Document:
  here = where(source, lineno)
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as e:
    raise DataError(f"{here}: invalid JSON ({e.msg} at column {e.colno}; truncated file?)") \
        from None
  if not isinstance(record, dict):
    raise DataError(f"{here}: expected a JSON object per line")
  doc_id, context = record.get("id"), record.get("context")
  if not isinstance(doc_id, str) or not _ID.match(doc_id):
    raise DataError(f"{here}: id {doc_id!r} is not of the form PMID_n")
  here = where(source, lineno, doc_id)
  if not isinstance(context, str) or not context.strip():
    raise DataError(f"{here}: missing or empty 'context'")
  annotations = record.get("annotations")
  if (not isinstance(annotations, list) or len(annotations) != 1
      or not isinstance(annotations[0], dict) or not isinstance(annotations[0].get("events"),
                                                                   list)):
    raise DataError(f"{here}: expected 'annotations' to be one {{\"events\": [...]}} object")
  sentence = _Sentence(doc_id, context, here, skipped, treats_from)
  for n, ev in enumerate(annotations[0]["events"], start=1):
    sentence.event(ev, n)
  meta = {"pmid": _ID.match(doc_id).group(1), "is_mult_event": bool(record.get("is_mult_event"))}
  doc = sentence.document(source, lineno, meta)
  validate_document(doc, PHEE_ENTITY_TYPES, PHEE_RELATION_TYPES)
  return doc


def read_phee_file(path: str | os.PathLike, treats_from: str = "all"
                   ) -> tuple[list[Document], collections.Counter]:
  """Reads a PHEE JSON-lines file; every error names file:line (and the sentence id)."""
  if treats_from not in ("all", "therapeutic"):
    raise ValueError(f"treats_from must be 'all' or 'therapeutic', got {treats_from!r}")
  path = Path(path)
  source = str(path)
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{source}: cannot read PHEE file ({e})") from None
  docs: list[Document] = []
  skipped: collections.Counter = collections.Counter()
  seen: dict[str, int] = {}
  for lineno, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    doc = _parse_line(raw, source, lineno, skipped, treats_from)
    if doc.id in seen:
      raise DataError(f"{doc.where()}: id already used at line {seen[doc.id]}")
    seen[doc.id] = lineno
    docs.append(doc)
  if not docs:
    raise DataError(f"{source}: no PHEE sentences found")
  return docs, skipped


def load_phee(root: str | os.PathLike, split: str, treats_from: str = "all") -> Corpus:
  """`root/json/{split}.json` (the published PMID-disjoint train/dev/test split)."""
  if split not in PHEE_SPLITS:
    raise DataError(f"PHEE split must be one of {list(PHEE_SPLITS)}, got {split!r}")
  docs, skipped = read_phee_file(Path(root) / "json" / f"{split}.json", treats_from)
  return Corpus("phee", split, docs, skipped)


def event_counts(corpus: Corpus) -> collections.Counter:
  """Events by type over a corpus (Adverse_event, Potential_therapeutic_event, Combination)."""
  counts: collections.Counter = collections.Counter()
  for d in corpus.documents:
    counts.update(d.meta.get("events", {}))
  return counts
