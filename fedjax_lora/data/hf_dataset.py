"""Any Hugging Face `datasets` dataset as annotated documents.

Two shapes are understood: token lists with BIO tags (names or ClassLabel ids, the
CoNLL/BigBio-kb-less layout) and raw text with character spans (`{"start", "end",
"type"}` dicts, optional `text` and `id`) plus optional relations (`{"head", "tail",
"type"}` naming entity ids or list positions). Errors name the dataset and row.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterable

from fedjax_lora.data.iob import IOB1_REPAIR, TaggedSentence, parse_tag
from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

PREFIX = "hf:"


def _tag_names(ds, field: str):
  feature = ds.features[field]
  inner = getattr(feature, "feature", None)
  return list(inner.names) if hasattr(inner, "names") else None


def _bio_document(row, i, source, tokens_field, tags_field, names, skipped) -> Document:
  tokens, tags = row[tokens_field], row[tags_field]
  here = where(source, i + 1)
  if len(tokens) != len(tags):
    raise DataError(f"{here}: {len(tokens)} tokens but {len(tags)} tags")
  sent = TaggedSentence(i + 1)
  for token, tag in zip(tokens, tags):
    if names is not None:
      if not 0 <= int(tag) < len(names):
        raise DataError(f"{here}: tag id {tag} outside the {len(names)} ClassLabel names")
      tag = names[int(tag)]
    if not token or any(c.isspace() for c in token):
      raise DataError(f"{here}: token {token!r} is empty or contains whitespace")
    try:
      kind, label = parse_tag(str(tag))
    except ValueError as e:
      raise DataError(f"{here}: {e}") from None
    continues = kind == "I" and sent.current_type() == label
    if kind == "I" and not continues:
      skipped[IOB1_REPAIR] += 1
    sent.add(token, kind, label, continues)
  return sent.build(str(row.get("id", i)), source)


def _span_document(row, i, source, text_field, spans_field, relations_field) -> Document:
  here = where(source, i + 1)
  text = row[text_field]
  if not isinstance(text, str):
    raise DataError(f"{here}: field {text_field!r} is not a string")
  entities = []
  for n, span in enumerate(row.get(spans_field) or []):
    try:
      start, end = int(span["start"]), int(span["end"])
      etype = span.get("type") or span["label"]
    except (KeyError, TypeError, ValueError):
      raise DataError(f"{here}: entity {n} needs integer start, end and a type (got {span!r})") \
          from None
    surface = span.get("text")
    entities.append(Entity(str(span.get("id") or f"T{n + 1}"), start, end, etype,
                           text[start:end] if surface is None else surface))
  ids = [e.id for e in entities]
  relations = []
  for n, rel in enumerate(row.get(relations_field) or [] if relations_field else []):
    try:
      head, tail, rtype = rel["head"], rel["tail"], rel["type"]
    except (KeyError, TypeError):
      raise DataError(f"{here}: relation {n} needs head, tail and type (got {rel!r})") from None
    head, tail = (ids[a] if isinstance(a, int) and 0 <= a < len(ids) else str(a)
                  for a in (head, tail))
    relations.append(Relation(head, tail, rtype, f"R{n + 1}"))
  return Document(str(row.get("id", i)), text, tuple(entities), tuple(relations), source, i + 1)


def from_hf_dataset(ds, name: str, split: str = "train", *, tokens_field: str = "tokens",
                    tags_field: str = "ner_tags", text_field: str = "text",
                    spans_field: str = "entities", relations_field: str = "relations",
                    entity_types: Iterable[str] | None = None) -> Corpus:
  """Documents from one `datasets.Dataset`, BIO or span layout, chosen by its columns."""
  cols = set(ds.column_names)
  source = f"{PREFIX}{name}[{split}] row"
  skipped: collections.Counter = collections.Counter()
  if {tokens_field, tags_field} <= cols:
    names = _tag_names(ds, tags_field)
    make = lambda row, i: _bio_document(row, i, source, tokens_field, tags_field, names, skipped)
  elif {text_field, spans_field} <= cols:
    rel = relations_field if relations_field in cols else None
    make = lambda row, i: _span_document(row, i, source, text_field, spans_field, rel)
  else:
    raise DataError(f"{PREFIX}{name}[{split}]: columns {sorted(cols)} have neither "
                    f"({tokens_field}, {tags_field}) nor ({text_field}, {spans_field})")
  docs = []
  for i, row in enumerate(ds):
    doc = make(row, i)
    validate_document(doc, entity_types)
    docs.append(doc)
  ids = collections.Counter(d.id for d in docs)
  if len(ids) < len(docs):
    dup = next(k for k, v in ids.items() if v > 1)
    raise DataError(f"{PREFIX}{name}[{split}]: document id {dup!r} occurs {ids[dup]} times")
  return Corpus(f"{PREFIX}{name}", split, docs, skipped)


def load_hf(path_or_name: str | os.PathLike, split: str, **fields) -> Corpus:
  """A dataset saved with `save_to_disk` (a directory) or, when online, a hub dataset."""
  import datasets

  path = Path(path_or_name)
  try:
    if path.is_dir():
      loaded = datasets.load_from_disk(str(path))
      if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
          raise DataError(f"{path}: no split {split!r}; splits: {sorted(loaded)}")
        loaded = loaded[split]
    else:
      loaded = datasets.load_dataset(str(path_or_name), split=split)
  except DataError:
    raise
  except Exception as e:  # datasets raises many types for missing or offline datasets
    raise DataError(f"{path_or_name}: cannot load dataset split {split!r} "
                    f"({type(e).__name__}: {e})") from None
  return from_hf_dataset(loaded, str(path_or_name), split, **fields)
