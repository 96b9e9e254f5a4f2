"""Instruction examples in the paper's HTML-markup style (method.md §6), for any corpus.

NER: the prompt lists only the entity types the example's source annotates, so a type a
site never labels is not taught as "absent". RE generalises the paper's modifier task:
one anchor (head) entity is marked in the input; the output also marks every entity it is
related to, with the relation type as the span class. Every mention or relation that
cannot be expressed (overlap, discontinuity, unmapped type) is counted in `TaskReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Mapping, Sequence

from fedjax_lora.data.markup import Span, render, select_flat
from fedjax_lora.data.records import DataError, Document

NER_TASK = ("### Task:\nYour task is to generate an HTML version of an input text, using HTML "
            "<span> tags to mark up specific entities.\n")
RE_TASK = ("### Task:\nYour task is to mark up modifier entities related to the entities "
           "marked with <span> tag in the input text.\n")
TASKS = ("ner", "re")
DISCONTINUOUS_POLICIES = ("first_fragment", "drop")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How one source's labels appear in prompts.

  `entity_map` / `relation_map` rename corpus types (several to one merges them; None or ""
  drops the type, counted). Types absent from a map keep their corpus name.
  `entity_glosses` / `relation_glosses`: "Use <span class="T"> to denote GLOSS." text;
  `entity_definitions`: optional "### Entity Definitions:" lines, each complete with its
  heading ("Medical Problem: The abnormal ..."), as a mapping type -> line or as
  (type, line) pairs, whose order is then kept (the paper lists them in its own order).
  """
  entity_map: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  relation_map: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  entity_glosses: Mapping[str, str] = dataclasses.field(default_factory=dict)
  relation_glosses: Mapping[str, str] = dataclasses.field(default_factory=dict)
  entity_definitions: Mapping[str, str] | Sequence[tuple[str, str]] = ()
  entity_order: Sequence[str] = ()  # prompt order; default: sorted
  undirected: Sequence[str] = ()  # corpus relation types that also hold tail -> head
  ner_types: Sequence[str] = ()   # site labels the NER task tags (default: all); others
                                  # only serve as relation arguments (paper: modifiers)
  group_by_concept: bool = False  # RE: one example per head concept (all its mentions
                                  # anchored), for document-level relations (BioRED)
  transitive: Sequence[str] = ()  # corpus relation types that group their arguments
                                  # (Chia's OR): every member relates to every other

  def entity_label(self, corpus_type: str) -> str | None:
    return self.entity_map.get(corpus_type, corpus_type) or None

  def relation_label(self, corpus_type: str) -> str | None:
    return self.relation_map.get(corpus_type, corpus_type) or None


@dataclasses.dataclass(frozen=True)
class Example:
  """One instruction example; `spans` are the gold spans over `text` that evaluation scores.

  `entity_labels` / `relation_labels` are the label lists its prompt offers (NER: the
  entity types to tag; RE: the anchor entity types and the relation types to mark), so
  evaluation scores the classes the example was asked for without reading the prompt.
  """
  source: str
  task: str
  doc_id: str
  prompt: str      # up to and including the "### Output Text:" line
  target: str      # the HTML answer
  text: str        # the plain input text
  spans: tuple[Span, ...]
  anchors: tuple[Span, ...] = ()  # RE: the marked head entity (not scored)
  # The source document the window came from (PHEE: its abstract's PMID), so that a
  # bootstrap can draw a note's sentences together; "" = doc_id.
  document: str = ""
  entity_labels: tuple[str, ...] = ()
  relation_labels: tuple[str, ...] = ()


def source_document(doc: Document) -> str:
  """The note a window was cut from: PHEE's PMID, else the window's parent document."""
  return str(doc.meta.get("pmid") or doc.meta.get("parent") or doc.id)


@dataclasses.dataclass
class TaskReport:
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, reason: str, n: int = 1):
    if n:
      self.counts[reason] += n


def _guides(labels: Sequence[str], glosses: Mapping[str, str]) -> str:
  return "".join(f'Use <span class="{t}"> to denote {glosses.get(t, f"a {t} mention")}.\n'
                 for t in labels)


def ner_prompt(text: str, labels: Sequence[str], spec: LabelSpec) -> str:
  parts = [NER_TASK, "\n### Entity Markup Guides:\n", _guides(labels, spec.entity_glosses)]
  defs_spec = spec.entity_definitions
  pairs = (sorted(defs_spec.items(), key=lambda kv: list(labels).index(kv[0])
                  if kv[0] in labels else len(labels))
           if isinstance(defs_spec, Mapping) else [tuple(p) for p in defs_spec])
  defs = [f"{line}\n" for t, line in pairs if t in labels]
  if defs:
    parts += ["\n### Entity Definitions:\n", *defs]
  parts += ["\n### Input Text:\n", text, "\n### Output Text:\n"]
  return "".join(parts)


def re_prompt(marked_text: str, entity_labels: Sequence[str], relation_labels: Sequence[str],
              spec: LabelSpec) -> str:
  return "".join([RE_TASK, "\n### Input Entity Markup Guides:\n",
                  _guides(entity_labels, spec.entity_glosses),
                  "\n### Modifier Entity Markup Guide:\n",
                  _guides(relation_labels, spec.relation_glosses),
                  "\n### Input Text:\n", marked_text, "\n\n### Output Text:\n"])


def source_labels(docs: Sequence[Document], spec: LabelSpec) -> tuple[list[str], list[str]]:
  """The (entity, relation) labels a source annotates after mapping: its prompt lists."""
  ents = {spec.entity_label(e.type) for d in docs for e in d.entities} - {None}
  if spec.ner_types:
    ents &= set(spec.ner_types)
  rels = {spec.relation_label(r.type) for d in docs for r in d.relations} - {None}
  order = [t for t in spec.entity_order if t in ents]
  return order + sorted(ents - set(order)), sorted(rels)


def mention_spans(doc: Document, spec: LabelSpec, policy: str, report: TaskReport):
  """Entity id -> Span over doc.text in site labels, after the discontinuity policy."""
  out = {}
  for e in doc.entities:
    label = spec.entity_label(e.type)
    if label is None:
      report.add(f"mention of unmapped type {e.type}")
      continue
    if e.discontinuous:
      if policy == "drop":
        report.add("discontinuous mention dropped")
        continue
      report.add("discontinuous mention: first fragment kept")
    out[e.id] = Span(e.start, e.end, label)
  return out


def _keep(key: str, fraction: float, seed: int) -> bool:
  if fraction >= 1.0:
    return True
  h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
  return h / 2**64 < fraction


def ner_examples(source: str, doc: Document, spans: Mapping[str, Span], labels: Sequence[str],
                 spec: LabelSpec, report: TaskReport, empty_fraction: float = 1.0,
                 seed: int = 0) -> list[Example]:
  """One example per window. Windows without mentions are kept with `empty_fraction`."""
  wanted = set(labels)
  outside = [s for s in spans.values() if s.label not in wanted]
  report.add("mention outside the NER label list (relation argument only)", len(outside))
  kept, dropped = select_flat(s for s in spans.values() if s.label in wanted)
  report.add("overlapping mention dropped (flat HTML)", len(dropped))
  if not kept and not _keep(doc.id, empty_fraction, seed):
    report.add("window without mentions not sampled (empty_fraction)")
    return []
  return [Example(source, "ner", doc.id, ner_prompt(doc.text, labels, spec),
                  render(doc.text, kept), doc.text, tuple(kept),
                  document=source_document(doc), entity_labels=tuple(labels))]


def _closed_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  """Every ordered pair within each connected component (for equivalence-like groups)."""
  parent: dict[str, str] = {}

  def find(x):
    parent.setdefault(x, x)
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for a, b in pairs:
    parent[find(a)] = find(b)
  groups = collections.defaultdict(list)
  for x in list(parent):
    groups[find(x)].append(x)
  return [(a, b) for members in groups.values() for a in sorted(members)
          for b in sorted(members) if a != b]


def _directed_pairs(doc: Document, spans: Mapping[str, Span], spec: LabelSpec,
                    report: TaskReport):
  """(head id, tail id, site label, head concept key) for every expressible relation."""
  relation_concepts = doc.meta.get("relation_concepts", {})
  out, closed = [], collections.defaultdict(list)
  for r in doc.relations:
    label = spec.relation_label(r.type)
    if label is None:
      report.add(f"relation of unmapped type {r.type}")
      continue
    if r.head not in spans or r.tail not in spans:
      report.add("relation with a dropped argument")
      continue
    if r.type in spec.transitive:
      closed[label].append((r.head, r.tail))
      continue
    head_concept, tail_concept = relation_concepts.get(r.id, (None, None))
    out.append((r.head, r.tail, label, head_concept))
    if r.type in spec.undirected:
      out.append((r.tail, r.head, label, tail_concept))
  for label, pairs in closed.items():
    out += [(a, b, label, None) for a, b in _closed_pairs(pairs)]
  return out


def re_examples(source: str, doc: Document, spans: Mapping[str, Span],
                entity_labels: Sequence[str], relation_labels: Sequence[str], spec: LabelSpec,
                report: TaskReport) -> list[Example]:
  """One example per head mention (or head concept) with at least one expressible relation.

  With `group_by_concept`, the anchor is every mention in the window that carries the
  relation's head concept id, so the model is never taught that a co-referent mention
  of the marked concept is unrelated.
  """
  by_id = {e.id: e for e in doc.entities}
  anchors_of: dict[str, set[str]] = collections.defaultdict(set)
  tails_of: dict[str, list[Span]] = collections.defaultdict(list)
  for head, tail, label, head_concept in _directed_pairs(doc, spans, spec, report):
    if spec.group_by_concept and (head_concept or by_id[head].concept):
      concept = head_concept or by_id[head].concept
      key = f"concept:{concept}"
      anchors_of[key].update(i for i in spans if concept in by_id[i].concept_keys)
    else:
      key = head
    anchors_of[key].add(head)
    tails_of[key].append(Span(spans[tail].start, spans[tail].end, label))
  examples = []
  for key, heads in anchors_of.items():
    anchors, clashing = select_flat(spans[h] for h in heads)
    report.add("anchor mention overlapping another anchor", len(clashing))
    tails = set(tails_of[key])
    covered = {t for t in tails if any(t.start < a.end and a.start < t.end for a in anchors)}
    report.add("related mention overlapping its anchor", len(covered))
    kept, dropped = select_flat(tails - covered)
    report.add("related mention overlapping another (flat HTML)", len(dropped))
    if not kept:
      report.add("relation example with nothing expressible")
      continue
    prompt = re_prompt(render(doc.text, anchors), entity_labels, relation_labels, spec)
    examples.append(Example(source, "re", f"{doc.id}@{key}", prompt,
                            render(doc.text, sorted([*anchors, *kept])), doc.text, tuple(kept),
                            tuple(anchors), document=source_document(doc),
                            entity_labels=tuple(entity_labels),
                            relation_labels=tuple(relation_labels)))
  return examples


def build_examples(source: str, windows: Sequence[Document], tasks: Sequence[str],
                   spec: LabelSpec, labels: tuple[Sequence[str], Sequence[str]],
                   report: TaskReport, discontinuous: str = "first_fragment",
                   empty_fraction: float = 1.0, seed: int = 0) -> list[Example]:
  """All examples of the requested tasks for one source's windows, in document order."""
  for t in tasks:
    if t not in TASKS:
      raise DataError(f"source {source}: unknown task {t!r}; choose from {TASKS}")
  if discontinuous not in DISCONTINUOUS_POLICIES:
    raise DataError(f"source {source}: discontinuous must be one of {DISCONTINUOUS_POLICIES}")
  entity_labels, relation_labels = tuple(labels[0]), tuple(labels[1])  # shared by examples
  out = []
  for doc in windows:
    spans = mention_spans(doc, spec, discontinuous, report)
    if "ner" in tasks:
      out += ner_examples(source, doc, spans, entity_labels, spec, report, empty_fraction, seed)
    if "re" in tasks and relation_labels:
      out += re_examples(source, doc, spans, entity_labels, relation_labels, spec, report)
  return out
