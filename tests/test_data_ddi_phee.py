"""DDI XML and PHEE JSON-lines readers: counts on the real corpora, errors on broken files."""

from __future__ import annotations

import collections
import json
import re

import pytest

from fedjax_lora.data import ddi_xml, phee_jsonl
from fedjax_lora.data.records import DataError
from tests.shared_data import require_shared


# ----------------------------------------------------------------------------- DDI, synthetic

def _ddi_xml(sentences: str, doc_id: str = "DDI-MedLine.d1") -> str:
  header = '<?xml version="1.0" encoding="UTF-8"?>'
  return f'{header}\n<document id="{doc_id}">\n{sentences}</document>\n'


GOOD_SENTENCE = """\
    <sentence id="DDI-MedLine.d1.s0" text="Aspirin increases the effect of oral anticoagulant drugs.">
        <entity id="DDI-MedLine.d1.s0.e0" charOffset="0-6"
            type="drug" text="Aspirin"/>
        <entity id="DDI-MedLine.d1.s0.e1" charOffset="32-35;51-55"
            type="group" text="oral drugs"/>
        <entity id="DDI-MedLine.d1.s0.e2" charOffset="32-55" type="group"
            text="oral anticoagulant drugs"/>
        <pair id="DDI-MedLine.d1.s0.p0" e1="DDI-MedLine.d1.s0.e0"
            e2="DDI-MedLine.d1.s0.e2" ddi="true" type="effect"/>
        <pair id="DDI-MedLine.d1.s0.p1" e1="DDI-MedLine.d1.s0.e0"
            e2="DDI-MedLine.d1.s0.e1" ddi="false"/>
        <pair id="DDI-MedLine.d1.s0.p2" e1="DDI-MedLine.d1.s0.e1"
            e2="DDI-MedLine.d1.s0.e2" ddi="true"/>
    </sentence>
    <sentence id="DDI-MedLine.d1.s1" text=""/>
    <sentence id="DDI-MedLine.d1.s2" text="No interactions were reported.&#xd;&#xa;"/>
"""


def test_ddi_reads_offsets_pairs_and_quirks(tmp_path):
  f = tmp_path / "12345.xml"
  f.write_text(_ddi_xml(GOOD_SENTENCE))
  docs, skipped = ddi_xml.read_ddi_file(f)
  assert [d.id for d in docs] == ["DDI-MedLine.d1.s0", "DDI-MedLine.d1.s2"]
  first = docs[0]
  assert first.line == 3 and first.source == str(f)
  assert first.meta == {"document": "DDI-MedLine.d1", "subcorpus": "MedLine", "pmid": "12345"}
  aspirin, oral_drugs, anticoag = first.entities
  assert (aspirin.start, aspirin.end, aspirin.text) == (0, 7, "Aspirin")  # inclusive end 6
  assert oral_drugs.fragments == ((32, 36), (51, 56)) and oral_drugs.text == "oral drugs"
  assert (anticoag.start, anticoag.end) == (32, 56)
  assert [(r.head, r.tail, r.type, r.id) for r in first.relations] == [
      (aspirin.id, anticoag.id, "effect", "DDI-MedLine.d1.s0.p0")]
  assert skipped == {"negative pairs": 1, "positive pair without type": 1,
                     "sentence with empty text": 1}
  assert docs[1].text.endswith("\r\n")  # character references kept, offsets rely on them


def test_ddi_repairs_off_by_one_offsets_and_joins_hyphenated_fragments(tmp_path):
  text = "Neither (R)- or (S)-warfarin nor alpha- and beta-blockers changed it."
  r, w = text.index("(R)-"), text.index("-warfarin") + 1
  a, b = text.index("alpha-"), text.index("blockers")
  sent = f"""\
    <sentence id="DDI-DrugBank.d9.s0" text="{text}">
        <entity id="DDI-DrugBank.d9.s0.e0" charOffset="{r - 1}-{r + 2};{w - 1}-{w + 6}"
            type="drug" text="(R)-warfarin"/>
        <entity id="DDI-DrugBank.d9.s0.e1" charOffset="{a}-{a + 5};{b}-{b + 7}"
            type="group" text="alpha-blockers"/>
    </sentence>
"""
  f = tmp_path / "Warfarin_ddi.xml"
  f.write_text(_ddi_xml(sent, "DDI-DrugBank.d9"))
  (doc,), skipped = ddi_xml.read_ddi_file(f)
  warfarin, blockers = doc.entities
  assert warfarin.fragments == ((r, r + 4), (w, w + 8)) and warfarin.text == "(R)- warfarin"
  assert blockers.text == "alpha- blockers"
  assert skipped == {"entity offsets repaired (shifted by +1)": 1}
  assert doc.meta == {"document": "DDI-DrugBank.d9", "subcorpus": "DrugBank"}


def _replace(text: str, old: str, new: str) -> str:
  assert old in text
  return text.replace(old, new, 1)


@pytest.mark.parametrize("old,new,line,message", [
    ('charOffset="0-6"', 'charOffset="0-99"', 4, r"entity DDI-MedLine\.d1\.s0\.e0: text 'Aspirin'"),
    ('charOffset="0-6"', 'charOffset="2-8"', 4, r"differs from the sentence text"),
    ('charOffset="0-6"', 'charOffset="6-0"', 4, r"charOffset '6-0'"),
    ('type="drug"', 'type="food"', 4, r"unknown entity type 'food'"),
    ('e2="DDI-MedLine.d1.s0.e2" ddi="true"', 'e2="DDI-MedLine.d1.s0.e7" ddi="true"', 10,
     r"argument 'DDI-MedLine\.d1\.s0\.e7' is not an entity"),
    ('type="effect"', 'type="synergy"', 10, r"unknown interaction type 'synergy'"),
    ('ddi="false"', 'ddi="maybe"', 12, r"ddi='maybe'"),
    ("</sentence>", "</sentenc>", 16, r"invalid XML \(mismatched tag"),
    ('<pair id="DDI-MedLine.d1.s0.p1"', '<relation id="DDI-MedLine.d1.s0.p1"', 12,
     r"unexpected element <relation>"),
])
def test_ddi_malformed_names_file_and_line(tmp_path, old, new, line, message):
  f = tmp_path / "bad.xml"
  f.write_text(_replace(_ddi_xml(GOOD_SENTENCE), old, new))
  with pytest.raises(DataError, match=rf"bad\.xml:{line}\b.*{message}"):
    ddi_xml.read_ddi_file(f)


def test_ddi_truncated_file_names_file_and_line(tmp_path):
  f = tmp_path / "cut.xml"
  content = _ddi_xml(GOOD_SENTENCE)
  f.write_text(content[: content.index("<sentence id=\"DDI-MedLine.d1.s1\"")])
  with pytest.raises(DataError, match=r"cut\.xml:17: invalid XML"):
    ddi_xml.read_ddi_file(f)


def test_ddi_dev_carve_is_a_fixed_hash():
  assert ddi_xml.is_dev_document("DDI-DrugBank.d436") is ddi_xml.is_dev_document(
      "DDI-DrugBank.d436")
  ids = [f"DDI-DrugBank.d{i}" for i in range(2000)]
  share = sum(map(ddi_xml.is_dev_document, ids)) / len(ids)
  assert 0.07 < share < 0.13


# ----------------------------------------------------------------------------- DDI, real corpus

@pytest.fixture(scope="module")
def ddi():
  root = require_shared("data", "raw", "ddi")
  return {split: ddi_xml.load_ddi(root, split) for split in ddi_xml.DDI_SPLITS}, root


def test_ddi_train_counts_match_data_md(ddi):
  corpora, root = ddi
  train, dev = corpora["train"], corpora["dev"]
  docs = {d.meta["document"] for c in (train, dev) for d in c.documents}
  # data.md: 714 documents (572 DrugBank + 142 MedLine) / 6,976 sentences. 71 sentences have
  # text="" (no entities, no pairs) and are skipped, so 6,905 Documents + 71 counted.
  assert len(docs) == 714
  assert sum(d.startswith("DDI-DrugBank.") for d in docs) == 572
  sentences = len(train.documents) + len(dev.documents)
  skipped = train.skipped + dev.skipped
  assert sentences == 6905 and skipped["sentence with empty text"] == 71
  assert train.entity_counts() + dev.entity_counts() == {
      "drug": 9425, "group": 3399, "brand": 1437, "drug_n": 504}
  # 4,020 ddi="true" pairs; the one without a type (Dextroamphetamine s29) is dropped.
  assert train.relation_counts() + dev.relation_counts() == {
      "mechanism": 1319, "effect": 1687, "advise": 826, "int": 188}
  assert skipped["positive pair without type"] == 1
  assert skipped["negative pairs"] == 23771
  # Eszopiclone s16 "(R)-warfarin" has offsets one character early; repaired, not dropped.
  assert skipped["entity offsets repaired (shifted by +1)"] == 1
  # 38 discontinuous mentions in Train (counted with grep on ';' inside charOffset).
  assert sum(e.discontinuous for c in (train, dev) for d in c.documents for e in d.entities) == 38


def test_ddi_dev_is_document_disjoint_and_fixed(ddi):
  corpora, root = ddi
  ids = ddi_xml.ddi_split_ids(root)
  train, dev = set(ids["train"]), set(ids["dev"])
  assert not train & dev
  assert train == {d.meta["document"] for d in corpora["train"].documents}
  assert dev == {d.meta["document"] for d in corpora["dev"].documents}
  assert len(train | dev) == 714
  assert len(dev) == 70  # SHA-256(document id) % 10 == 0, computed independently
  assert all(ddi_xml.is_dev_document(i) for i in dev)
  assert len(corpora["dev"].documents) == 674 and len(corpora["train"].documents) == 6231


def test_ddi_test_splits_match_data_md(ddi):
  corpora, _ = ddi
  test, ner = corpora["test"], corpora["ner_test"]
  assert len({d.meta["document"] for d in test.documents}) == 191
  assert len(test.documents) == 1299
  assert sum(test.relation_counts().values()) == 979
  assert test.relation_counts() == {"mechanism": 302, "effect": 360, "advise": 221, "int": 96}
  assert len({d.meta["document"] for d in ner.documents}) == 112
  assert len(ner.documents) == 665 and not ner.relation_counts()
  assert ner.entity_counts() == {"drug": 351, "group": 155, "brand": 59, "drug_n": 121}
  medline = [d for d in test.documents if d.meta["subcorpus"] == "MedLine"]
  assert all(re.fullmatch(r"\d+", d.meta["pmid"]) for d in medline)
  assert "Test for DDI Extraction task" in test.documents[0].source


# ----------------------------------------------------------------------------- PHEE, synthetic

def _phee_record(doc_id: str, context: str, events: list) -> str:
  return json.dumps({"id": doc_id, "context": context, "is_mult_event": len(events) > 1,
                     "annotations": [{"events": events}]})


def _span(context: str, *mentions) -> dict:
  """Each mention is a string or a tuple of fragment strings (found left to right)."""
  texts, starts = [], []
  for m in mentions:
    frags = (m,) if isinstance(m, str) else m
    texts.append(list(frags))
    starts.append([context.index(f) for f in frags])
  return {"text": texts, "start": starts, "entity_id": [f"T{i}" for i in range(len(texts))]}


CONTEXT = ("A 60-year-old man given oral methotrexate 10 mg weekly and cyclosporine 5 mg "
           "for psoriasis developed severe pancytopenia, which improved with filgrastim.")


def _phee_events(c: str = CONTEXT) -> list:
  return [
      {"event_id": "E1", "event_type": "Adverse_event",
       "Trigger": _span(c, "developed"),
       "Subject": {**_span(c, "A 60-year-old man"), "Age": _span(c, "60-year-old"),
                   "Gender": _span(c, "man")},
       "Treatment": {**_span(c, ("methotrexate", "cyclosporine")),
                     "Drug": _span(c, "methotrexate", "cyclosporine"),
                     "Route": _span(c, "oral"), "Dosage": _span(c, "10 mg", "5 mg"),
                     "Freq": _span(c, "weekly"), "Disorder": _span(c, "psoriasis"),
                     "Combination": [{"event_id": "E3", "event_type": "Combination",
                                      "Trigger": _span(c, "and"),
                                      "Drug": _span(c, "cyclosporine", "methotrexate")}]},
       "Effect": _span(c, ("severe", "pancytopenia")),
       "Severity": {**_span(c, "severe"), "value": "High"}},
      {"event_id": "E2", "event_type": "Potential_therapeutic_event",
       "Trigger": _span(c, "improved"),
       "Subject": {**_span(c, "A 60-year-old man"), "Age": _span(c, "60-year-old")},
       "Treatment": {**_span(c, "filgrastim"), "Drug": _span(c, "filgrastim")},
       "Effect": _span(c, "pancytopenia")},
  ]


def test_phee_converts_events(tmp_path):
  f = tmp_path / "train.json"
  f.write_text(_phee_record("123_1", CONTEXT, _phee_events()) + "\n")
  (doc,), skipped = phee_jsonl.read_phee_file(f)
  assert doc.id == "123_1" and doc.line == 1 and doc.meta["pmid"] == "123"
  assert doc.meta["events"] == {"Adverse_event": 1, "Potential_therapeutic_event": 1,
                                "Combination": 1}
  by_text = {(e.type, e.text): e for e in doc.entities}
  assert sorted(by_text) == sorted([
      ("Age", "60-year-old"), ("Gender", "man"), ("Route", "oral"), ("Drug", "methotrexate"),
      ("Dosage", "10 mg"), ("Freq", "weekly"), ("Drug", "cyclosporine"), ("Dosage", "5 mg"),
      ("Disorder", "psoriasis"), ("Effect", "severe pancytopenia"), ("Effect", "pancytopenia"),
      ("Drug", "filgrastim")])  # the Age repeated in E2 is merged
  assert [e.id for e in doc.entities] == [f"T{i}" for i in range(1, 13)]
  assert by_text["Effect", "severe pancytopenia"].discontinuous
  rels = {(doc.entity(r.head).text, doc.entity(r.tail).text, r.type) for r in doc.relations}
  assert rels == {
      ("methotrexate", "severe pancytopenia", "causes"),
      ("cyclosporine", "severe pancytopenia", "causes"),
      ("methotrexate", "psoriasis", "treats"), ("cyclosporine", "psoriasis", "treats"),
      ("methotrexate", "oral", "has_route"), ("cyclosporine", "oral", "has_route"),
      ("methotrexate", "weekly", "has_frequency"), ("cyclosporine", "weekly", "has_frequency"),
      ("methotrexate", "cyclosporine", "combined_with")}
  assert skipped["has_dosage pair with several drugs and values (pairing not annotated)"] == 4
  assert skipped["therapeutic-event Drug-Effect pair (no relation type)"] == 1
  assert skipped["Trigger span"] == 2 and skipped["Severity cue span"] == 1
  assert skipped["Subject span (composite; arguments kept)"] == 2
  # the Age repeated in E2 and both Combination drugs (already Treatment drugs)
  assert skipped["duplicate mention merged (same type and offsets)"] == 3

  docs, skipped = phee_jsonl.read_phee_file(f, treats_from="therapeutic")
  assert not {r.type for r in docs[0].relations} & {"treats"}
  assert skipped["adverse-event Drug-indication pair (treats_from=therapeutic)"] == 2


def _good_lines() -> list[str]:
  return [_phee_record(f"{100 + i}_1", CONTEXT, _phee_events()) for i in range(3)]


@pytest.mark.parametrize("line,mutate,message", [
    (2, lambda s: s[:-5], r"invalid JSON"),
    (3, lambda s: s.replace('"start": [[24]]', '"start": [[900]]'), r"offsets 900-904 of 'oral'"),
    (2, lambda s: s.replace('"start": [[24]]', '"start": [[25]]'),
     r"span text 'oral' differs from the text at 25-29"),
    (1, lambda s: s.replace('"Adverse_event"', '"Adverse_evnt"'), r"unknown event_type"),
    (2, lambda s: s.replace('"Freq"', '"Frequency"'), r"unknown arguments \['Frequency'\]"),
    (3, lambda s: s.replace('"102_1"', '"101_1"'), r"id already used at line 2"),
    (1, lambda s: s.replace('"100_1"', '"PMID100"'), r"id 'PMID100' is not of the form PMID_n"),
])
def test_phee_malformed_names_file_and_line(tmp_path, line, mutate, message):
  lines = _good_lines()
  lines[line - 1] = mutate(lines[line - 1])
  assert lines[line - 1] != _good_lines()[line - 1]
  f = tmp_path / "dev.json"
  f.write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=rf"dev\.json:{line}\b.*{message}"):
    phee_jsonl.read_phee_file(f)


def test_phee_truncated_file_names_last_line(tmp_path):
  text = "\n".join(_good_lines())
  f = tmp_path / "test.json"
  f.write_text(text[: len(text) - 40])
  with pytest.raises(DataError, match=r"test\.json:3: .*invalid JSON"):
    phee_jsonl.read_phee_file(f)


# ----------------------------------------------------------------------------- PHEE, real corpus

@pytest.fixture(scope="module")
def phee():
  root = require_shared("data", "raw", "phee")
  return {split: phee_jsonl.load_phee(root, split) for split in phee_jsonl.PHEE_SPLITS}


def test_phee_counts_match_data_md(phee):
  sizes = {s: len(c.documents) for s, c in phee.items()}
  assert sizes == {"train": 2898, "dev": 961, "test": 968}  # 4,827 sentences
  events = sum((phee_jsonl.event_counts(c) for c in phee.values()), collections.Counter())
  assert events["Adverse_event"] == 4485 and events["Potential_therapeutic_event"] == 534
  assert events["Combination"] == 660  # nested drug-drug events: 380 + 152 + 128
  pmids = {s: {d.meta["pmid"] for d in c.documents} for s, c in phee.items()}
  assert len(pmids["train"] | pmids["dev"] | pmids["test"]) == 1838
  assert not (pmids["train"] & pmids["dev"] or pmids["train"] & pmids["test"]
              or pmids["dev"] & pmids["test"])


def test_phee_entity_and_relation_counts(phee):
  # Not published: distinct (type, fragments) argument mentions per sentence, counted with
  # an independent one-off script over the JSON (Subject/Treatment arguments, Effect and
  # Combination drugs; Trigger, composite Subject/Treatment spans and cue spans excluded).
  assert phee["train"].entity_counts() == {
      "Drug": 3591, "Effect": 2803, "Disorder": 1222, "Age": 399, "Route": 331,
      "Gender": 328, "Population": 273, "Dosage": 260, "Time_elapsed": 174, "Duration": 90,
      "Freq": 60, "Race": 40}
  assert sum(phee["dev"].entity_counts().values()) == 3213
  assert sum(phee["test"].entity_counts().values()) == 3326
  # causes / treats / combined_with were recomputed the same way (treats from every event's
  # Treatment.Disorder; 336 if only therapeutic events are used).
  train = phee["train"].relation_counts()
  assert (train["causes"], train["treats"], train["combined_with"]) == (3237, 1225, 536)
  assert train["has_route"] == 346 and train["has_dosage"] == 290
  assert phee["train"].skipped["Combination with fewer than two distinct drugs"] == 1
