"""HTML span markup: text + spans -> `<span class="TYPE">...</span>` and back.

The paper's targets copy the input with entities wrapped in flat (non-nested) span tags.
Only the exact tag forms below are markup; any other `<` in clinical text ("<5 mg") is
plain text, so rendering never needs escaping and parsing never eats real text.
The parser is tolerant because it also reads model output: broken markup is repaired
and every repair is counted, never raised.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, Sequence

OPEN_TAG = re.compile(r"""<span\s+class\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)'|([^\s"'<>]+))\s*>""")
CLOSE_TAG = re.compile(r"</span\s*>")
ANY_TAG = re.compile(f"{OPEN_TAG.pattern}|{CLOSE_TAG.pattern}")


@dataclasses.dataclass(frozen=True, order=True)
class Span:
  start: int
  end: int
  label: str


def select_flat(spans: Iterable[Span]) -> tuple[list[Span], list[Span]]:
  """(kept, dropped): a non-overlapping subset, preferring earlier then longer spans.

  Flat HTML cannot express overlapping or nested mentions; callers count `dropped`.
  Identical duplicates are merged silently since they carry no extra information.
  """
  kept, dropped, last_end = [], [], -1
  for s in sorted(set(spans), key=lambda s: (s.start, -(s.end - s.start), s.label)):
    if s.start < last_end:
      dropped.append(s)
    else:
      kept.append(s)
      last_end = s.end
  return kept, dropped


def render(text: str, spans: Sequence[Span]) -> str:
  """Wraps each span of `text` in a span tag. Spans must be flat (see select_flat)."""
  out, pos = [], 0
  for s in sorted(spans):
    if s.start < pos or not 0 <= s.start < s.end <= len(text):
      raise ValueError(f"span {s} overlaps another or lies outside the text (length {len(text)})")
    if '"' in s.label or "<" in s.label or ">" in s.label:
      raise ValueError(f"label {s.label!r} cannot be used as an HTML class")
    out += [text[pos:s.start], f'<span class="{s.label}">', text[s.start:s.end], "</span>"]
    pos = s.end
  out.append(text[pos:])
  return "".join(out)


@dataclasses.dataclass
class Parsed:
  text: str                     # the output with all recognised tags removed
  spans: list[Span]             # over `text`
  problems: collections.Counter  # repairs made: unclosed, stray close, nested, unknown label...


def parse(html: str, labels: Iterable[str] | None = None) -> Parsed:
  """Spans from markup, repairing what a model may break.

  - a nested open tag closes the outer span there ("nested span");
  - a close tag with nothing open is ignored ("stray close tag");
  - an unclosed span runs to the end of the text ("unclosed span");
  - empty spans are ignored ("empty span");
  - with `labels` given, spans of other classes are kept out ("unknown label").
  """
  labels = None if labels is None else frozenset(labels)
  problems: collections.Counter = collections.Counter()
  text_parts: list[str] = []
  spans: list[Span] = []
  pos = out_len = 0
  open_label: str | None = None
  open_start = 0

  def close(at: int):
    nonlocal open_label
    if open_label is not None:
      if at == open_start:
        problems["empty span"] += 1
      elif labels is not None and open_label not in labels:
        problems["unknown label"] += 1
      else:
        spans.append(Span(open_start, at, open_label))
    open_label = None

  for m in ANY_TAG.finditer(html):
    text_parts.append(html[pos:m.start()])
    out_len += m.start() - pos
    pos = m.end()
    if m.group(0).startswith("</"):
      if open_label is None:
        problems["stray close tag"] += 1
      close(out_len)
    else:
      if open_label is not None:
        problems["nested span"] += 1
        close(out_len)
      open_label = next(g for g in m.groups()[:3] if g is not None).strip()
      open_start = out_len
  text_parts.append(html[pos:])
  out_len += len(html) - pos
  if open_label is not None:
    problems["unclosed span"] += 1
    close(out_len)
  return Parsed("".join(text_parts), spans, problems)
