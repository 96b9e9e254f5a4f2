"""The paper's scoring protocol (method.md §7): html -> tokens -> alignment -> span scores.

Pipeline for one example (`align_example`):

1. **Tokenise** gold input text and the parsed model output the paper's way: pad `: ; , .`
   with spaces, then split on whitespace (`tokenize`). Character offsets are kept.
2. **Spans to tokens**: a token belongs to a span if it overlaps it. Flat markup can still
   give two spans one token ("<X>mg</X>/<Y>day</Y>" is the single token "mg/day"); the later
   span is dropped and counted.
3. **Align** predicted tokens to gold tokens (`align_tokens`, greedy, left to right, see its
   docstring). Each predicted span becomes the gold-token range from its first to its last
   aligned token (gold tokens skipped inside it, i.e. words the model changed, are covered);
   a predicted span none of whose tokens aligned is dropped and counted. Gold tokens nothing
   aligned to are `O`. Since alignment is monotone, predicted spans stay flat and ordered, so
   the predicted IOB2 sequence on gold tokens is always valid.
4. **Score** in gold-token space, per example, summing counts over the test set (micro):
   - strict: exact token boundaries and class;
   - lenient: one-to-one greedy matching walking the tokens left to right: at each token, if
     the gold span and the predicted span covering it are both still unmatched and of the
     same class, they match (the `ner_metrics` rule the paper used). A predicted span
     covering two gold entities therefore matches only one. P = matched/#pred,
     R = matched/#gold, F1 harmonic; a 0/0 ratio is 0 (as seqeval with zero_division=0).
   Headline scores collapse every type to one class (`COLLAPSED`); `per_type` keeps types, so
   a span of the wrong type is a hit in the collapsed scores and a miss in per-type ones.
   `seqeval` repeats entity-level strict scoring with seqeval itself (IOB2, mode="strict") on
   the same aligned sequences, one sequence per example; it must equal `strict`.

Counting per example rather than over one concatenated token stream differs from the paper
only where an entity would run across an example boundary, which this avoids.

RE (§7.5): pass the relation labels as `labels` and the anchor entity labels as
`ignore_labels`, and/or give anchors per example: predicted spans of ignored labels, and
predicted spans whose aligned token range is exactly an anchor's, are not scored.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from fedjax_lora.data.markup import Span, parse

COLLAPSED = "unified_class"
JACCARD_THRESHOLD = 0.9
ALIGN_WINDOW = 64  # gold tokens searched ahead of the current position (None: to the end)

_TOKEN = re.compile(r"[:;,.]|[^\s:;,.]+")


class Token(NamedTuple):
  text: str
  start: int
  end: int


def tokenize(text: str) -> list[Token]:
  """Pad `: ; , .` with spaces and split on whitespace, keeping each token's offsets."""
  return [Token(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _token_spans(tokens: Sequence[Token], spans: Iterable[Span], problems: collections.Counter,
                 who: str) -> list[tuple[int, int, str]]:
  """Spans as sorted, disjoint (first token, last token + 1, label) ranges."""
  owner = [False] * len(tokens)
  starts = [t.start for t in tokens]
  ends = [t.end for t in tokens]
  out = []
  for s in sorted(spans, key=lambda s: (s.start, -(s.end - s.start), s.label)):
    # Tokens overlapping [s.start, s.end): end > s.start and start < s.end.
    lo, hi = bisect.bisect_right(ends, s.start), bisect.bisect_left(starts, s.end)
    if lo >= hi:
      problems[f"{who} span covering no token"] += 1
    elif any(owner[lo:hi]):
      problems[f"{who} span sharing a token with another (dropped)"] += 1
    else:
      owner[lo:hi] = [True] * (hi - lo)
      out.append((lo, hi, s.label))
  out.sort()
  return out


def _bio(n: int, tspans: Iterable[tuple[int, int, str]], collapse: bool = False) -> list[str]:
  tags = ["O"] * n
  for a, b, label in tspans:
    label = COLLAPSED if collapse else label
    tags[a] = f"B-{label}"
    for i in range(a + 1, b):
      tags[i] = f"I-{label}"
  return tags


def spans_to_bio(text: str, spans: Iterable[Span],
                 problems: collections.Counter | None = None) -> tuple[list[Token], list[str]]:
  """(tokens, IOB2 tags) of `text`; a token belongs to a span if it overlaps it.

  A span sharing a token with an earlier (or longer) one is dropped and counted in `problems`.
  """
  tokens = tokenize(text)
  problems = collections.Counter() if problems is None else problems
  return tokens, _bio(len(tokens), _token_spans(tokens, spans, problems, "gold"))


def bio_to_spans(tags: Sequence[str]) -> list[tuple[int, int, str]]:
  """Entities of an IOB2 sequence as seqeval's strict mode reads them.

  B-X starts an entity that I-X tokens continue; an I- tag that continues nothing (after O,
  or after another type) is not part of any entity.
  """
  out, cur = [], None  # cur = [start, label]
  for i, tag in enumerate(tags):
    prefix, label = tag[:1], tag[2:]
    if cur is not None and not (prefix == "I" and label == cur[1]):
      out.append((cur[0], i, cur[1]))
      cur = None
    if prefix == "B":
      cur = [i, label]
  if cur is not None:
    out.append((cur[0], len(tags), cur[1]))
  return out


def bio_strict_scores(y_true: Sequence[Sequence[str]],
                      y_pred: Sequence[Sequence[str]]) -> dict[str, Any]:
  """Entity-level strict scores of IOB2 sequences (one per sentence): micro and per type.

  Our own implementation of what seqeval computes with mode="strict", scheme=IOB2.
  """
  if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
    raise ValueError("y_true and y_pred differ in shape")
  c: collections.Counter = collections.Counter()
  for t, p in zip(y_true, y_pred):
    gold, pred = set(bio_to_spans(t)), set(bio_to_spans(p))
    for s in gold:
      c[s[2], "n_gold"] += 1
    for s in pred:
      c[s[2], "n_pred"] += 1
    for s in gold & pred:
      c[s[2], "tp"] += 1
  types = sorted({k[0] for k in c})
  return {"micro": prf(sum(c[t, "tp"] for t in types), sum(c[t, "n_pred"] for t in types),
                       sum(c[t, "n_gold"] for t in types)),
          "per_type": {t: prf(c[t, "tp"], c[t, "n_pred"], c[t, "n_gold"]) for t in types}}


def jaccard_match(a: str, b: str, threshold: float = JACCARD_THRESHOLD) -> bool:
  """Jaccard similarity of the lower-cased character sets of `a` and `b` is > threshold."""
  sa, sb = set(a.lower()), set(b.lower())
  union = sa | sb
  return bool(union) and len(sa & sb) / len(union) > threshold


def align_tokens(pred: Sequence[str], gold: Sequence[str], window: int | None = ALIGN_WINDOW,
                 threshold: float = JACCARD_THRESHOLD) -> list[int | None]:
  """For each predicted token, the index of the gold token it aligns to, or None.

  Greedy, left to right, monotone. `i` is the next unused gold token. For predicted token j:
  - if it matches gold token i, it aligns there;
  - otherwise the first gold k in (i, i + window] that it matches is taken, but only if the
    match is confirmed by the next pair (predicted j+1 matches gold k+1, or either side has
    no next token), so a frequent token ("," "the") the model invented cannot pull the
    alignment far ahead; gold tokens i..k-1 stay unaligned;
  - otherwise it is unaligned (text the model invented or changed) and `i` does not move.
  Then `i` becomes the aligned index + 1. "Matches" is `jaccard_match`.
  """
  sets_p = [frozenset(t.lower()) for t in pred]
  sets_g = [frozenset(t.lower()) for t in gold]

  def match(j: int, k: int) -> bool:
    a, b = sets_p[j], sets_g[k]
    union = len(a | b)
    return union > 0 and len(a & b) / union > threshold

  n, m = len(gold), len(pred)
  out: list[int | None] = [None] * m
  i = 0
  for j in range(m):
    if i >= n:
      break
    if match(j, i):
      out[j], i = i, i + 1
      continue
    stop = n if window is None else min(n, i + 1 + window)
    for k in range(i + 1, stop):
      if match(j, k) and (j + 1 >= m or k + 1 >= n or match(j + 1, k + 1)):
        out[j], i = k, k + 1
        break
  return out


@dataclasses.dataclass
class Aligned:
  """One example in gold-token space: typed (start, end, label) token ranges and IOB2 tags."""
  tokens: list[Token]
  gold: list[tuple[int, int, str]]
  pred: list[tuple[int, int, str]]
  problems: collections.Counter
  skipped: collections.Counter
  n_pred_tokens: int

  def tags(self, collapse: bool = False) -> tuple[list[str], list[str]]:
    n = len(self.tokens)
    return _bio(n, self.gold, collapse), _bio(n, self.pred, collapse)


def align_example(text: str, gold_spans: Iterable[Span], html: str,
                  labels: Iterable[str] | None = None, ignore_labels: Iterable[str] = (),
                  anchors: Iterable[Span] = (), window: int | None = ALIGN_WINDOW) -> Aligned:
  """Gold spans over `text` and the model's `html` output, both as gold-token ranges."""
  ignore = frozenset(ignore_labels)
  html = html or ""
  problems: collections.Counter = collections.Counter()
  skipped: collections.Counter = collections.Counter()
  gold_tokens = tokenize(text)
  gold = _token_spans(gold_tokens, [s for s in gold_spans if s.label not in ignore], problems,
                      "gold")
  if not html.strip():
    problems["empty prediction"] += 1
  parsed = parse(html, None if labels is None else frozenset(labels) | ignore)
  problems.update(parsed.problems)
  kept = [s for s in parsed.spans if s.label not in ignore]
  skipped["ignored-label span"] += len(parsed.spans) - len(kept)
  pred_tokens = tokenize(parsed.text)
  pred_ranges = _token_spans(pred_tokens, kept, problems, "predicted")
  where = align_tokens([t.text for t in pred_tokens], [t.text for t in gold_tokens], window)
  aligned = [k for k in where if k is not None]
  problems["predicted tokens unaligned"] += len(where) - len(aligned)
  problems["gold tokens unaligned"] += len(gold_tokens) - len(aligned)
  anchor_ranges = {(a, b) for a, b, _ in _token_spans(gold_tokens, anchors,
                                                      collections.Counter(), "anchor")}
  pred = []
  for a, b, label in pred_ranges:
    hit = [k for k in where[a:b] if k is not None]
    if not hit:
      problems["predicted span with no aligned token"] += 1
    elif (hit[0], hit[-1] + 1) in anchor_ranges:
      skipped["anchor span"] += 1
    else:
      pred.append((hit[0], hit[-1] + 1, label))
  return Aligned(gold_tokens, gold, pred, +problems, +skipped, len(pred_tokens))


def _lenient_pairs(n: int, gold, pred) -> list[tuple[int, int]]:
  """(gold index, pred index) matched one-to-one by the left-to-right token walk."""
  g_at: list[int | None] = [None] * n
  p_at: list[int | None] = [None] * n
  for idx, (a, b, _) in enumerate(gold):
    g_at[a:b] = [idx] * (b - a)
  for idx, (a, b, _) in enumerate(pred):
    p_at[a:b] = [idx] * (b - a)
  used_g, used_p, pairs = set(), set(), []
  for g, p in zip(g_at, p_at):
    if (g is not None and p is not None and g not in used_g and p not in used_p
        and gold[g][2] == pred[p][2]):
      used_g.add(g)
      used_p.add(p)
      pairs.append((g, p))
  return pairs


def prf(tp: int, n_pred: int, n_gold: int) -> dict[str, Any]:
  """Counts and precision/recall/F1 (0 where undefined)."""
  p = tp / n_pred if n_pred else 0.0
  r = tp / n_gold if n_gold else 0.0
  f = 2 * p * r / (p + r) if p + r else 0.0
  return {"tp": tp, "fp": n_pred - tp, "fn": n_gold - tp, "n_pred": n_pred, "n_gold": n_gold,
          "precision": p, "recall": r, "f1": f}


class _Counts:
  def __init__(self):
    self.c = collections.Counter()  # (kind, field) -> int

  def add(self, kind: str, tp: int, n_pred: int, n_gold: int):
    self.c[kind, "tp"] += tp
    self.c[kind, "n_pred"] += n_pred
    self.c[kind, "n_gold"] += n_gold

  def result(self, kind: str) -> dict[str, Any]:
    return prf(self.c[kind, "tp"], self.c[kind, "n_pred"], self.c[kind, "n_gold"])


def _collapse(ranges):
  return [(a, b, COLLAPSED) for a, b, _ in ranges]


def count_example(al: Aligned) -> dict[str, dict[str, tuple[int, int, int]]]:
  """(tp, n_pred, n_gold) for strict and lenient, collapsed ("*") and per type."""
  n = len(al.tokens)
  out: dict[str, dict[str, tuple[int, int, int]]] = {"strict": {}, "lenient": {}}
  groups = [("*", _collapse(al.gold), _collapse(al.pred))]
  for t in sorted({s[2] for s in al.gold + al.pred}):
    groups.append((t, [s for s in al.gold if s[2] == t], [s for s in al.pred if s[2] == t]))
  for key, gold, pred in groups:
    out["strict"][key] = (len(set(gold) & set(pred)), len(pred), len(gold))
    out["lenient"][key] = (len(_lenient_pairs(n, gold, pred)), len(pred), len(gold))
  return out


def _seqeval_block(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, Any]:
  from seqeval.metrics import classification_report
  from seqeval.scheme import IOB2
  if not any(t != "O" for seq in y_true + y_pred for t in seq):
    return {"micro": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}, "per_type": {}}
  rep = classification_report(y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True,
                              zero_division=0)
  conv = lambda d: {"precision": float(d["precision"]), "recall": float(d["recall"]),
                    "f1": float(d["f1-score"]), "support": int(d["support"])}
  avg = {"micro avg", "macro avg", "weighted avg"}
  return {"micro": conv(rep["micro avg"]),
          "per_type": {k: conv(v) for k, v in rep.items() if k not in avg}}


def _gold_item(item) -> tuple[str, Sequence[Span], Sequence[Span]]:
  if hasattr(item, "text") and hasattr(item, "spans"):
    return item.text, item.spans, getattr(item, "anchors", ())
  text, spans, *rest = item
  return text, spans, (rest[0] if rest else ())


def score(examples_gold: Sequence[Any], predictions: Sequence[str],
          labels: Iterable[str] | None = None, ignore_labels: Iterable[str] = (),
          use_anchors: bool = True, window: int | None = ALIGN_WINDOW,
          return_aligned: bool = False) -> dict[str, Any]:
  """Scores of one test set, micro-averaged over its examples (see the module docstring).

  `examples_gold`: `Example`s or (text, gold spans[, anchors]) tuples; `predictions`: the
  model's html outputs, one per example. `labels`: evaluated classes (predicted spans of any
  other class become plain text, counted as "unknown label"); None accepts every class.
  `ignore_labels`: classes never scored (RE anchors), on both sides, not counted as problems.
  `use_anchors`: drop predicted spans exactly on an example's anchor (RE).

  Returns a JSON-ready dict: `strict`, `lenient` (type-collapsed counts and P/R/F1),
  `per_type` {type: {strict, lenient}}, `seqeval` {collapsed, typed: {micro, per_type}},
  `problems` and `skipped` counters, sizes, and `per_example` {strict, lenient: one
  [tp, n_pred, n_gold] per example, type-collapsed} for paired bootstrap intervals
  (`eval/bootstrap.py`). With `return_aligned`, also `aligned`
  (the per-example `Aligned` objects, not JSON).
  """
  if len(examples_gold) != len(predictions):
    raise ValueError(f"{len(examples_gold)} gold examples but {len(predictions)} predictions")
  labels = None if labels is None else frozenset(labels)
  counts = _Counts()
  problems: collections.Counter = collections.Counter()
  skipped: collections.Counter = collections.Counter()
  types: set[str] = set()
  y_true, y_pred, y_true_c, y_pred_c, aligned = [], [], [], [], []
  n_gold_tokens = n_pred_tokens = 0
  per_example: dict[str, list[list[int]]] = {"strict": [], "lenient": []}
  for item, html in zip(examples_gold, predictions):
    text, spans, anchors = _gold_item(item)
    al = align_example(text, spans, html or "", labels, ignore_labels,
                       anchors if use_anchors else (), window)
    for kind, per in count_example(al).items():
      for key, (tp, n_pred, n_gold) in per.items():
        counts.add(f"{kind}/{key}", tp, n_pred, n_gold)
        if key != "*":
          types.add(key)
        else:
          per_example[kind].append([tp, n_pred, n_gold])
    problems.update(al.problems)
    skipped.update(al.skipped)
    n_gold_tokens += len(al.tokens)
    n_pred_tokens += al.n_pred_tokens
    if al.tokens:
      for collapse, yt, yp in [(False, y_true, y_pred), (True, y_true_c, y_pred_c)]:
        t, p = al.tags(collapse)
        yt.append(t)
        yp.append(p)
    if return_aligned:
      aligned.append(al)
  typed = _seqeval_block(y_true, y_pred)
  collapsed = _seqeval_block(y_true_c, y_pred_c)["micro"]
  out = {
      "n_examples": len(predictions), "n_gold_tokens": n_gold_tokens,
      "n_pred_tokens": n_pred_tokens,
      "strict": counts.result("strict/*"), "lenient": counts.result("lenient/*"),
      "per_type": {t: {"strict": counts.result(f"strict/{t}"),
                       "lenient": counts.result(f"lenient/{t}")} for t in sorted(types)},
      "seqeval": {"collapsed": collapsed, "typed": typed},
      "problems": dict(sorted(problems.items())), "skipped": dict(sorted(skipped.items())),
      "per_example": per_example,
  }
  if return_aligned:
    out["aligned"] = aligned
  return out


def harmonic_mean(values: Iterable[float]) -> float:
  """Harmonic mean; 0 if any value is 0 (its limit). Raises on an empty input."""
  values = list(values)
  if not values:
    raise ValueError("harmonic mean of nothing")
  if any(v <= 0 for v in values):
    return 0.0
  return len(values) / sum(1 / v for v in values)


def worst_site(values: Mapping[str, float]) -> dict[str, Any]:
  """{"site", "value"} of the lowest value (ties: first site in sorted order)."""
  if not values:
    raise ValueError("worst site of no sites")
  site = min(sorted(values), key=lambda s: values[s])
  return {"site": site, "value": values[site]}


def aggregate(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Across sites: micro (pooled counts), macro (mean of site P/R/F1), worst site, H-mean.

  `per_site` maps site -> a `score` result. Micro pools the strict/lenient/per-type counts;
  seqeval's, which carries no counts, is macro-averaged only.
  """
  if not per_site:
    raise ValueError("no sites to aggregate")
  sites = sorted(per_site)
  out: dict[str, Any] = {"sites": sites, "micro": {}, "macro": {}, "worst_site": {},
                         "hmean_f1": {}}
  for kind in ("strict", "lenient"):
    tp = sum(per_site[s][kind]["tp"] for s in sites)
    out["micro"][kind] = prf(tp, sum(per_site[s][kind]["n_pred"] for s in sites),
                             sum(per_site[s][kind]["n_gold"] for s in sites))
  per_type: dict[str, dict[str, Any]] = {}
  for t in sorted({t for s in sites for t in per_site[s].get("per_type", {})}):
    per_type[t] = {}
    for kind in ("strict", "lenient"):
      rows = [per_site[s]["per_type"][t][kind] for s in sites if t in per_site[s]["per_type"]]
      per_type[t][kind] = prf(sum(r["tp"] for r in rows), sum(r["n_pred"] for r in rows),
                              sum(r["n_gold"] for r in rows))
  out["micro"]["per_type"] = per_type
  blocks = {"strict": lambda r: r["strict"], "lenient": lambda r: r["lenient"],
            "seqeval": lambda r: r["seqeval"]["collapsed"]}
  for kind, get in blocks.items():
    rows = {s: get(per_site[s]) for s in sites}
    out["macro"][kind] = {m: math.fsum(r[m] for r in rows.values()) / len(sites)
                          for m in ("precision", "recall", "f1")}
    f1 = {s: r["f1"] for s, r in rows.items()}
    out["worst_site"][kind] = worst_site(f1)
    out["hmean_f1"][kind] = harmonic_mean(f1.values())
  problems: collections.Counter = collections.Counter()
  for s in sites:
    problems.update(per_site[s].get("problems", {}))
  out["problems"] = dict(sorted(problems.items()))
  return out
