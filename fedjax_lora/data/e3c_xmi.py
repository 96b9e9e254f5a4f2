"""E3C reader: UIMA CAS XMI exported by WebAnno, one clinical case per file.

The text is the `sofaString` of the single `cas:Sofa`. Annotations are `custom:<TYPE>`
elements with `begin`/`end` offsets and no surface text. Links live in separate
`custom:<...>Link` elements (`role`, `target`) that the source annotation lists by
xmi:id in one attribute:

  EVENT.TLINK      -> EVENTTLINKLink       temporal relation    (kind TLINK)
  TIMEX3.timexLink -> TIMEX3TimexLinkLink  temporal relation    (kind TIMEXLINK)
  EVENT.ALINK      -> EVENTALINKLink       aspectual relation   (kind ALINK)
  RML.PERTAINSTO   -> RMLPERTAINSTOLink    PERTAINS             (kind PERTAINSTO)

A Relation's type is the link's role (BEFORE, INITIATES, PERTAINS, ...), its head the
source annotation, its tail the target, and its id `<kind>:<link xmi:id>` so the link
kind stays recoverable (`link_kind`). Sentence bounds go to `meta["sentences"]` so later
stages can window by sentence.

Discontinuous CLINENTITY mentions carry `discontinuous="DISCONTINUOUS"` and cover the
whole extent ("periorbital and facial oedema"); the XMI does not give the fragments, so
they are kept as that covering span (listed in `meta["discontinuous"]`) or dropped and
counted (`discontinuous="drop"`).
"""

from __future__ import annotations

import collections
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping

from fedjax_lora.data.records import Corpus, DataError, Document, Entity, Relation, where
from fedjax_lora.data.records import validate_document

E3C_ENTITY_TYPES = ("CLINENTITY", "EVENT", "TIMEX3", "ACTOR", "BODYPART", "RML")
TLINK_TYPES = ("BEFORE", "CONTAINS", "OVERLAP", "SIMULTANEOUS", "BEGINS-ON", "ENDS-ON")
ALINK_TYPES = ("INITIATES", "CONTINUES", "TERMINATES", "REINITIATES")
PERTAINS_TYPES = ("PERTAINS",)
E3C_RELATION_TYPES = TLINK_TYPES + ALINK_TYPES + PERTAINS_TYPES

# (source type, attribute) -> (link element name, kind, allowed roles)
LINKS = {
    ("EVENT", "TLINK"): ("EVENTTLINKLink", "TLINK", TLINK_TYPES),
    ("TIMEX3", "timexLink"): ("TIMEX3TimexLinkLink", "TIMEXLINK", TLINK_TYPES),
    ("EVENT", "ALINK"): ("EVENTALINKLink", "ALINK", ALINK_TYPES),
    ("RML", "PERTAINSTO"): ("RMLPERTAINSTOLink", "PERTAINSTO", PERTAINS_TYPES),
}
DISCONTINUOUS_FLAG = "DISCONTINUOUS"

_XMI_ID = "{http://www.omg.org/XMI}id"
_CUSTOM = "{http:///webanno/custom.ecore}"
_CAS = "{http:///uima/cas.ecore}"
_SEGMENTATION = "{http:///de/tudarmstadt/ukp/dkpro/core/api/segmentation/type.ecore}"
_SENTENCE = f"{_SEGMENTATION}Sentence"
_CUI = re.compile(r"C\d{7}")
_CUI_LESS = ("CUILESS", "CUI-LESS")  # the corpus's "no UMLS concept" marker
_ID_ATTR = re.compile(rb'xmi:id="([^"]*)"')
# Never the target of a link or an annotation: left out of the xmi:id bookkeeping.
_UNREFERENCED = {f"{_SEGMENTATION}Token",
                 "{http:///de/tudarmstadt/ukp/dkpro/core/api/metadata/type.ecore}"
                 "TagsetDescription"}
_SPAN_KEYS = {_XMI_ID, "sofa", "begin", "end"}

_LAYER1 = Path("data_annotation", "English", "layer1")
_LAYER2 = Path("data_annotation", "English", "layer2")
_VALIDATED = Path("data_validation", "English", "layer2")
_SPLIT_FILE = Path("documentation", "train_test_split.txt")


def link_kind(relation: Relation) -> str:
  """TLINK, TIMEXLINK, ALINK or PERTAINSTO: which XMI link element the relation came from."""
  return relation.id.split(":", 1)[0]


def _id_lines(raw: bytes) -> dict[str, int]:
  """xmi:id -> line, so errors can name a line when the XMI is pretty-printed."""
  lines, pos, line = {}, 0, 1
  for m in _ID_ATTR.finditer(raw):
    line += raw.count(b"\n", pos, m.start())
    pos = m.start()
    lines.setdefault(m.group(1).decode("utf-8", "replace"), line)
  return lines


class _Xmi:
  """One parsed file plus the bits needed to name a place in it."""

  def __init__(self, path: Path):
    self.path, self.source, self.doc_id = path, str(path), path.stem
    try:
      raw = path.read_bytes()
    except OSError as e:
      raise DataError(f"{where(self.source)}: cannot read: {e}") from e
    try:
      self.root = ET.fromstring(raw)
    except ET.ParseError as e:
      line = e.position[0] if e.position else None
      raise DataError(f"{where(self.source, line, self.doc_id)}: invalid XML: {e}") from None
    self.raw = raw

  def err(self, xmi_id: str | None, msg: str) -> DataError:
    line = _id_lines(self.raw).get(xmi_id) if xmi_id else None
    at = f" (xmi:id {xmi_id})" if xmi_id else ""
    return DataError(f"{where(self.source, line, self.doc_id)}:{at} {msg}")


def _kind(el: ET.Element) -> str:
  if el.tag.startswith(_CUSTOM) and el.tag.endswith("Link"):
    return "link"
  if el.get("begin") is not None:
    return "span"
  return el.tag.split("}")[-1]  # Sofa, View, NULL, TagsetDescription ...


def _offsets(x: _Xmi, el: ET.Element, n: int, what: str) -> tuple[int, int]:
  xid = el.get(_XMI_ID)
  try:
    begin, end = int(el.get("begin", "")), int(el.get("end", ""))
  except ValueError:
    raise x.err(xid, f"{what}: begin/end {el.get('begin')!r}/{el.get('end')!r} are not "
                     "integers") from None
  if not 0 <= begin <= end <= n:
    raise x.err(xid, f"{what}: offsets {begin}-{end} outside the text (length {n})")
  return begin, end


def _concept(x: _Xmi, el: ET.Element, skipped: collections.Counter) -> str:
  """The UMLS CUI: `entityID`, else a CUI that annotators typed into another field;
  "" for CUI-LESS mentions."""
  cui = el.get("entityID", "")
  if cui in _CUI_LESS:
    return ""
  if cui:
    if _CUI.fullmatch(cui):
      return cui
    skipped["CLINENTITY entityID not a well-formed CUI (concept left empty)"] += 1
    return ""
  for attr in ("discontinuous", "xtra"):
    if _CUI.fullmatch(el.get(attr, "")):
      skipped[f"CLINENTITY CUI read from the {attr!r} attribute (no entityID)"] += 1
      return el.get(attr)
  return ""  # CUI-LESS


def read_e3c_xmi(path: str | os.PathLike, discontinuous: str = "keep"
                 ) -> tuple[Document, collections.Counter]:
  """Reads one E3C XMI file into a Document (id = file stem) and a count of what was skipped
  or repaired. `discontinuous`: "keep" (covering span) or "drop" flagged CLINENTITY mentions.
  """
  if discontinuous not in ("keep", "drop"):
    raise ValueError(f"discontinuous must be 'keep' or 'drop', got {discontinuous!r}")
  x = _Xmi(Path(path))
  skipped: collections.Counter = collections.Counter()
  sofas = [el for el in x.root if el.tag == f"{_CAS}Sofa"]
  if len(sofas) != 1 or sofas[0].get("sofaString") is None:
    raise x.err(None, f"expected one cas:Sofa with a sofaString, found {len(sofas)} "
                      "(truncated or not a WebAnno CAS?)")
  text, sofa_id = sofas[0].get("sofaString"), sofas[0].get(_XMI_ID)
  n = len(text)

  # A few files reuse an xmi:id across element kinds (a CLINENTITY sharing the Sofa's or a
  # link's id); references stay unambiguous because each points at one kind.
  kinds: dict[str, dict[str, ET.Element]] = collections.defaultdict(dict)
  for el in x.root:
    xid = el.get(_XMI_ID)
    if xid is None or el.tag in _UNREFERENCED:
      continue
    kind = _kind(el)
    if xid in kinds[kind]:
      raise x.err(xid, f"duplicate xmi:id among {kind} elements")
    if any(xid in other for k, other in kinds.items() if k != kind):
      skipped["xmi:id reused by elements of different kinds (resolved by kind)"] += 1
    kinds[kind][xid] = el
    if el.get("sofa") not in (None, sofa_id):
      raise x.err(xid, f"annotation refers to sofa {el.get('sofa')!r}, not the text "
                       f"(sofa {sofa_id!r})")
  links, spans = kinds["link"], kinds["span"]

  sentences, entities, attrs, flagged, meta = [], [], {}, [], {}
  kept: set[str] = set()
  dropped: set[str] = set()
  for el in x.root:
    xid = el.get(_XMI_ID)
    if el.tag == _SENTENCE:
      sentences.append(_offsets(x, el, n, "Sentence"))
      continue
    if not el.tag.startswith(_CUSTOM):
      continue  # tokens, tagsets, document metadata, views
    name = el.tag[len(_CUSTOM):]
    if name.endswith("Link"):
      continue  # read from the source annotation below
    if name == "METADATA":
      meta.update({"doc_name": el.get("docName", ""), "doc_time": el.get("docTime", ""),
                   "doc_source": el.get("docSource", "")})
      continue
    if name not in E3C_ENTITY_TYPES:
      raise x.err(xid, f"unknown annotation type custom:{name}; known: "
                       f"{', '.join(E3C_ENTITY_TYPES)}")
    begin, end = _offsets(x, el, n, name)
    if begin == end:
      skipped[f"zero-length {name} annotation"] += 1
      dropped.add(xid)
      continue
    concept = _concept(x, el, skipped) if name == "CLINENTITY" else ""
    if name == "CLINENTITY" and el.get("discontinuous") == DISCONTINUOUS_FLAG:
      if discontinuous == "drop":
        skipped["CLINENTITY flagged DISCONTINUOUS (fragments not given)"] += 1
        dropped.add(xid)
        continue
      flagged.append(xid)
    entities.append(Entity(xid, begin, end, name, text[begin:end], concept=concept))
    kept.add(xid)
    attrs[xid] = {k: v for k, v in el.attrib.items()
                  if k not in _SPAN_KEYS and (name, k) not in LINKS}

  relations, referenced, seen = [], set(), set()
  for el in x.root:
    name = el.tag[len(_CUSTOM):] if el.tag.startswith(_CUSTOM) else ""
    head = el.get(_XMI_ID)
    for (src, attr), (link_name, kind, roles) in LINKS.items():
      if name != src or not el.get(attr):
        continue
      for link_id in el.get(attr).split():
        link = links.get(link_id)
        if link is None or link.tag != f"{_CUSTOM}{link_name}":
          other = link if link is not None else spans.get(link_id)
          got = "nothing" if other is None else other.tag.split("}")[-1]
          raise x.err(head, f"{src}.{attr} refers to xmi:id {link_id}, which is {got}, "
                            f"not a custom:{link_name}")
        referenced.add(link_id)
        role, tail = link.get("role", ""), link.get("target", "")
        if role not in roles:
          raise x.err(link_id, f"{link_name} role {role!r} is not one of {', '.join(roles)}")
        if head in dropped or tail in dropped:
          skipped[f"{kind} touching a skipped annotation"] += 1
          continue
        if tail not in kept:
          target = spans.get(tail)
          got = "nothing" if target is None else target.tag.split("}")[-1]
          raise x.err(link_id, f"{link_name} target {tail!r} is {got}, not an annotation "
                               f"of type {', '.join(E3C_ENTITY_TYPES)}")
        if head == tail:
          skipped[f"{kind} from an annotation to itself"] += 1
          continue
        if (head, tail, role) in seen:
          skipped[f"duplicate {kind} {role}"] += 1
          continue
        seen.add((head, tail, role))
        relations.append(Relation(head, tail, role, f"{kind}:{link_id}"))

  for link_id, el in links.items():
    if link_id not in referenced:
      skipped[f"{el.tag[len(_CUSTOM):]} not referenced by any annotation"] += 1

  meta.update({"sentences": tuple(sorted(sentences)), "discontinuous": tuple(flagged),
               "attributes": attrs})
  doc = Document(x.doc_id, text, tuple(entities), tuple(relations), source=x.source,
                 meta=meta)
  validate_document(doc, E3C_ENTITY_TYPES, E3C_RELATION_TYPES)
  return doc, skipped


def read_e3c_dir(folder: str | os.PathLike, ids: set[str] | None = None,
                 discontinuous: str = "keep") -> tuple[list[Document], collections.Counter]:
  """Every *.xml in `folder` (sorted), or only the stems in `ids`."""
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"{where(folder)}: E3C folder not found")
  docs, skipped = [], collections.Counter()
  for path in sorted(folder.glob("*.xml")):
    if ids is None or path.stem in ids:
      doc, skip = read_e3c_xmi(path, discontinuous)
      docs.append(doc)
      skipped.update(skip)
  if not docs:
    raise DataError(f"{where(folder)}: no E3C XMI documents found")
  return docs, skipped


def official_train_ids(path: str | os.PathLike, language: str = "ENGLISH") -> list[str]:
  """The layer-1 training ids listed under `language` in documentation/train_test_split.txt:
  a heading line, then one line of quoted, comma-separated ids."""
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{where(path)}: cannot read the split file: {e}") from e
  for i, line in enumerate(lines):
    if line.strip() == language:
      body = next(((j, l) for j, l in enumerate(lines[i + 1:], i + 2) if l.strip()), None)
      if body is None:
        break
      lineno, ids = body[0], re.findall(r"'([A-Z]{2}\d+)'", body[1])
      if not ids:
        raise DataError(f"{where(path, lineno)}: no quoted document ids after {language}")
      return ids
  raise DataError(f"{where(path)}: no {language} section")


def load_e3c(root: str | os.PathLike, split: str, layer: int = 1,
             discontinuous: str = "keep") -> Corpus:
  """E3C English. Layer 1 (gold): `train` = the official training ids, `test` = the rest,
  `all`. Layer 2: `silver` = the dictionary-matched documents minus the 19 manually
  validated ones, `validated` = those 19 (gold), `all` = all silver documents."""
  root = Path(root)
  if layer == 1:
    if split not in ("train", "test", "all"):
      raise DataError(f"E3C layer 1 split must be train, test or all, got {split!r}")
    train = set(official_train_ids(root / _SPLIT_FILE))
    present = {p.stem for p in (root / _LAYER1).glob("*.xml")}
    missing = sorted(train - present)
    if missing:
      raise DataError(f"{where(root / _SPLIT_FILE)}: training ids with no layer-1 file in "
                      f"{root / _LAYER1}: {', '.join(missing)}")
    ids = {"train": train, "test": present - train, "all": present}[split]
    docs, skipped = read_e3c_dir(root / _LAYER1, ids, discontinuous)
    return Corpus("e3c", split, docs, skipped)
  if layer == 2:
    if split not in ("silver", "validated", "all"):
      raise DataError(f"E3C layer 2 split must be silver, validated or all, got {split!r}")
    if split == "validated":
      docs, skipped = read_e3c_dir(root / _VALIDATED, None, discontinuous)
      return Corpus("e3c_layer2", split, docs, skipped)
    ids = None
    if split == "silver":
      ids = ({p.stem for p in (root / _LAYER2).glob("*.xml")}
             - {p.stem for p in (root / _VALIDATED).glob("*.xml")})
    docs, skipped = read_e3c_dir(root / _LAYER2, ids, discontinuous)
    if split == "silver":
      n = len({p.stem for p in (root / _LAYER2).glob("*.xml")}) - len(docs)
      skipped["layer-2 silver document held out (its gold version is split 'validated')"] += n
    return Corpus("e3c_layer2", split, docs, skipped)
  raise DataError(f"E3C layer must be 1 or 2, got {layer!r}")


def entity_attributes(doc: Document) -> Mapping[str, Mapping[str, str]]:
  """Native attributes per entity id (docTimeRel, polarity, role, timex3Class, value, ...)."""
  return doc.meta.get("attributes", {})  # type: ignore[return-value]
