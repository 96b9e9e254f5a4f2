"""Splitting long documents into windows that fit a token budget, never cutting a mention.

An HTML-markup example holds its text twice (input and tagged output), so long abstracts
and case reports must be cut before the 800-token truncation would silently chop the
answer. Windows follow sentence (or line) boundaries; a boundary inside a mention is
never used. Relations whose arguments land in different windows cannot be expressed and
are counted, not silently lost.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Sequence

from fedjax_lora.data.records import Document

TokenCounter = Callable[[Sequence[str]], Sequence[int]]
UNITS = ("sentence", "line", "document")

# A sentence ends at . ! ? followed by whitespace and an upper-case letter, digit or
# bracket; abbreviations like "e.g. the" or "Fig. 3" rarely meet that, and a rare wrong
# split only costs a slightly shorter window.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9(\[])|\n+")


def approx_token_count(texts: Sequence[str]) -> list[int]:
  """About 4 characters per token: a tokenizer-free stand-in for quick planning."""
  return [max(1, (len(t) + 3) // 4) for t in texts]


def unit_bounds(text: str, unit: str) -> list[tuple[int, int]]:
  """(start, end) of each non-blank sentence/line, whitespace trimmed."""
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
  if unit == "document":
    cuts = []
  elif unit == "line":
    cuts = [m.span() for m in re.finditer(r"\n+", text)]
  else:
    cuts = [m.span() for m in _SENTENCE_END.finditer(text)]
  bounds, pos = [], 0
  for a, b in cuts + [(len(text), len(text))]:
    piece = text[pos:a]
    if piece.strip():
      lead = len(piece) - len(piece.lstrip())
      bounds.append((pos + lead, pos + len(piece.rstrip())))
    pos = b
  return bounds


def _extent(e) -> tuple[int, int]:
  return min(s for s, _ in e.pieces), max(t for _, t in e.pieces)


def _merge_across_mentions(bounds, doc: Document):
  """Joins consecutive units whenever a mention starts before one and ends after the other."""
  extents = [_extent(e) for e in doc.entities]
  merged = []
  for a, b in bounds:
    if merged and any(s < a and t > merged[-1][1] for s, t in extents):
      merged[-1] = (merged[-1][0], b)
    else:
      merged.append((a, b))
  return merged


def _split_long(text: str, a: int, b: int, doc: Document, count: TokenCounter, budget: int):
  """Cuts one over-long unit at spaces outside mentions, greedily up to `budget`."""
  inside = [_extent(e) for e in doc.entities]
  spaces = [m.start() for m in re.finditer(r"\s+", text[a:b])]
  cuts = [a + c for c in spaces if not any(s < a + c < t for s, t in inside)]
  words, pos = [], a
  for c in cuts + [b]:
    if text[pos:c].strip():
      words.append((pos, c))
    pos = c
  sizes = count([text[s:t] for s, t in words])
  pieces, start, used = [], None, 0
  for (s, t), n in zip(words, sizes):
    if start is not None and used + n > budget:
      pieces.append((start, prev_end))
      start, used = None, 0
    if start is None:
      start = s
    used += n
    prev_end = t
  if start is not None:
    pieces.append((start, prev_end))
  return [(s + len(text[s:t]) - len(text[s:t].lstrip()), t) for s, t in pieces]


@dataclasses.dataclass
class WindowReport:
  windows: int = 0
  split_documents: int = 0
  oversized_units_cut: int = 0
  relations_across_windows: int = 0
  concept_relations_lost: int = 0  # relation ids (e.g. BioRED concept pairs) with no pair left
  entities_outside_windows: int = 0  # e.g. a mention in whitespace trimmed off the ends


def split_document(doc: Document, max_tokens: int | None, unit: str = "sentence",
                   pack: bool = True, count_tokens: TokenCounter = approx_token_count,
                   report: WindowReport | None = None) -> list[Document]:
  """Windows of `doc`, each at most `max_tokens` by `count_tokens` where mentions allow.

  Sentences come from `doc.meta["sentences"]` when the reader provides them.
  `pack=False` makes every unit its own window (one Chia criterion per example);
  `max_tokens=None` only splits into units. Offsets are rebased to each window.
  """
  report = report if report is not None else WindowReport()
  text = doc.text
  given = doc.meta.get("sentences") if unit == "sentence" else None
  if given:  # the corpus's own sentence segmentation (E3C) beats our regex
    bounds = [(a + len(text[a:b]) - len(text[a:b].lstrip()), a + len(text[a:b].rstrip()))
              for a, b in given if text[a:b].strip()]
  else:
    bounds = unit_bounds(text, unit)
  bounds = _merge_across_mentions(bounds, doc)
  if not bounds:
    return []
  if max_tokens is not None:
    sizes = count_tokens([text[a:b] for a, b in bounds])
    fitted = []
    for (a, b), n in zip(bounds, sizes):
      if n > max_tokens:
        report.oversized_units_cut += 1
        fitted.extend(_split_long(text, a, b, doc, count_tokens, max_tokens))
      else:
        fitted.append((a, b))
    bounds = fitted
  if pack and len(bounds) > 1:
    sizes = count_tokens([text[a:b] for a, b in bounds]) if max_tokens is not None else None
    groups, used = [], 0
    for i, (a, b) in enumerate(bounds):
      n = sizes[i] if sizes is not None else 0
      if groups and (max_tokens is None or used + n <= max_tokens):
        groups[-1] = (groups[-1][0], b)
        used += n
      else:
        groups.append((a, b))
        used = n
    bounds = groups if max_tokens is not None else [(bounds[0][0], bounds[-1][1])]
  return _materialise(doc, bounds, report)


def _materialise(doc: Document, bounds, report: WindowReport) -> list[Document]:
  windows, home = [], {}
  for i, (a, b) in enumerate(bounds):
    ents = []
    for e in doc.entities:
      lo, hi = _extent(e)
      if a <= lo and hi <= b:
        home[e.id] = i
        ents.append(dataclasses.replace(
            e, start=e.start - a, end=e.end - a,
            fragments=tuple((s - a, t - a) for s, t in e.fragments)))
    windows.append((a, b, ents))
  report.entities_outside_windows += len(doc.entities) - len(home)
  rels_by_window = collections.defaultdict(list)
  surviving_ids, all_ids = set(), set()
  for r in doc.relations:
    all_ids.add(r.id or id(r))
    hw, tw = home.get(r.head), home.get(r.tail)
    if hw is not None and hw == tw:
      rels_by_window[hw].append(r)
      surviving_ids.add(r.id or id(r))
    else:
      report.relations_across_windows += 1
  report.concept_relations_lost += len(all_ids - surviving_ids)
  single = len(windows) == 1 and windows[0][:2] == (0, len(doc.text))
  out = []
  for i, (a, b, ents) in enumerate(windows):
    out.append(dataclasses.replace(
        doc, id=doc.id if single else f"{doc.id}#{i}", text=doc.text[a:b],
        entities=tuple(ents), relations=tuple(rels_by_window[i]),
        meta={**doc.meta, "parent": doc.id, "window": i, "offset": a,
              **({"sentences": tuple((max(s, a) - a, min(t, b) - a)
                                     for s, t in doc.meta["sentences"] if s < b and t > a)}
                 if doc.meta.get("sentences") else {})}))
  report.windows += len(out)
  report.split_documents += int(len(out) > 1)
  return out
