"""Examples on disk at a site (and the server's validation examples): one JSON object per line.

A site's data directory holds `train.jsonl` (and `dev.jsonl` when it has a dev split) of
the instruction examples it trains on, already cut from its notes (what
`launch.prepare_data` makes of a corpus); the site tokenizes them itself with the base's
tokenizer, so no token ids cross sites. Each line is an `Example` with its spans.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fedjax_lora.data.markup import Span
from fedjax_lora.data.tasks import Example
from fedjax_lora.errors import DataError
from fedjax_lora import files

_SPAN_FIELDS = ("spans", "anchors")
_TUPLE_FIELDS = ("entity_labels", "relation_labels")


def example_to_json(example: Example) -> str:
  return json.dumps(dataclasses.asdict(example), sort_keys=True)


def example_from_json(obj: dict) -> Example:
  fields = dict(obj)
  for name in _SPAN_FIELDS:
    fields[name] = tuple(Span(**s) for s in fields.get(name, ()))
  for name in _TUPLE_FIELDS:
    fields[name] = tuple(fields.get(name, ()))
  return Example(**fields)


def write_examples(path: str | Path, examples) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomic(path, "".join(example_to_json(e) + "\n" for e in examples))
  return path


def read_examples(path: str | Path) -> list[Example]:
  """The examples of a JSONL file; DataError names the file, line and field at fault."""
  path = Path(path)
  if not path.exists():
    raise DataError(f"{path}: no such file (a site's data directory holds train.jsonl and, "
                    "if it has a dev split, dev.jsonl)")
  out = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      out.append(example_from_json(json.loads(line)))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
    except TypeError as e:  # a missing or unknown Example field
      raise DataError(f"{path}:{number}: not an example record ({e})") from None
  if not out:
    raise DataError(f"{path}: no examples")
  return out
