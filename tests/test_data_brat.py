"""brat reader and Chia loader: the real corpus (counts vs data.md) and malformed files."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from fedjax_lora.data.brat import (CHIA_ENTITY_TYPES, CHIA_RELATION_TYPES, chia_split_of,
                                   chia_trial_ids, load_chia, read_brat)
from fedjax_lora.data.records import DataError
from tests.shared_data import require_shared

# ----------------------------------------------------------------------------- real Chia

# data.md §2.2 entity counts. They equal the raw T-line counts of the release.
PUBLISHED_ENTITIES = {
    "Condition": 12039, "Qualifier": 4157, "Value": 4002, "Drug": 3801, "Procedure": 3595,
    "Temporal": 3580, "Measurement": 3305, "Person": 1666, "Observation": 1216,
    "Reference_point": 934, "Negation": 843, "Multiplier": 671, "Mood": 616, "Device": 386,
    "Visit": 165}
# Read counts differ by exactly the three known annotation errors (CHIA_BAD_SPANS):
# NCT02137369_inc T8 (Condition) and NCT02590822_inc T5 (Measurement) run over the next
# criterion line while their text field holds the first line only; NCT03460002_inc T5
# (Visit) says "Person Surveillance Site" over "Demographic Surveillance Site".
EXPECTED_ENTITIES = {**PUBLISHED_ENTITIES, "Condition": 12038, "Measurement": 3304,
                     "Visit": 164}

# data.md §2.2 relation counts = raw R-line counts. Read counts are lower by the relations
# whose argument was dropped (junk label or bad span), exact duplicates and one self-loop
# (`multi T100 T100`); see EXPECTED_SKIPPED. E.g. AND 3,715 - 38 dropped arg - 3 dup.
PUBLISHED_RELATIONS = {
    "Has_value": 3806, "AND": 3715, "Has_qualifier": 3535, "Has_temporal": 3344,
    "Subsumes": 2061, "Has_index": 905, "Has_negation": 849, "Has_multiplier": 632,
    "Has_mood": 527, "multi": 508, "Has_context": 223}
# OR: 7 binary `R ... OR` lines + the chains of the 5,011 `* OR` groups (n-1 edges per
# group after removing 16 dropped members and 1 repeated member; 9 groups collapse to
# < 2 members), minus 9 duplicate edges = 8,056. Independently recounted with a one-off
# script over the .ann files (not using this module).
EXPECTED_RELATIONS = {
    "Has_value": 3805, "AND": 3674, "Has_qualifier": 3532, "Has_temporal": 3331,
    "Subsumes": 2050, "Has_index": 899, "Has_negation": 843, "Has_multiplier": 632,
    "Has_mood": 523, "multi": 499, "Has_context": 220, "OR": 8056}

# Error labels sum to 2,264 (data.md: "about 2,300"); special categories 1,275 plus Line
# (whole-criterion markup, 100) and one stray c-Requires_causality = 1,376 ("about 1,400").
ERROR_LABELS = {"Non-query-able": 786, "Parsing_Error": 608, "Non-representable": 304,
                "Undefined_semantics": 265, "Context_Error": 143, "Grammar_Error": 82,
                "Not_a_criteria": 76}
SPECIAL_LABELS = {"Post-eligibility": 485, "Informed_consent": 258, "Subjective_judgement": 241,
                  "Pregnancy_considerations": 190, "Competing_trial": 96,
                  "Intoxication_considerations": 5, "Line": 100, "c-Requires_causality": 1}
EXPECTED_SKIPPED = {
    **{f"entity label {k}": v for k, v in {**ERROR_LABELS, **SPECIAL_LABELS}.items()},
    "entity with a bad span (span crosses criterion lines)": 2,
    "entity with a bad span (text field differs from the text)": 1,
    "relation label causal": 37, "relation label v-AND": 4, "relation label NOT (* groups)": 4,
    "relation AND with a dropped argument": 38, "relation Has_context with a dropped argument": 2,
    "relation Has_mood with a dropped argument": 4,
    "relation Has_negation with a dropped argument": 6,
    "relation Has_temporal with a dropped argument": 13,
    "relation Subsumes with a dropped argument": 11, "relation multi with a dropped argument": 8,
    "self-relation multi": 1,
    "duplicate relation AND": 3, "duplicate relation Has_context": 1,
    "duplicate relation Has_index": 6, "duplicate relation Has_qualifier": 3,
    "duplicate relation Has_value": 1, "duplicate relation OR": 9,
    "OR group member dropped with its entity": 16, "OR group member repeated": 1,
    "OR group left with fewer than 2 members": 9,
    # Not skips: the number of `*` group lines, so the original group count is recoverable.
    "OR groups read (* lines, not a skip)": 5011,
    "NOT groups read (* lines, not a skip)": 4,
}


@pytest.fixture(scope="module")
def root() -> Path:
  return require_shared("data", "raw", "chia")


@pytest.fixture(scope="module")
def chia(root):
  return load_chia(root, "all")


def test_chia_documents(chia):
  assert len(chia.documents) == 2000
  trials = collections.defaultdict(set)
  for d in chia.documents:
    trials[d.meta["trial"]].add(d.meta["section"])
    assert d.id == f"{d.meta['trial']}_{d.meta['section']}"
    assert "\r" not in d.text
  assert len(trials) == 1000 and all(s == {"inc", "exc"} for s in trials.values())
  # Three exclusion files hold only "    \n" and have empty .ann files; they stay documents.
  blank = sorted(d.id for d in chia.documents if not d.text.strip())
  assert blank == ["NCT01490034_exc", "NCT02222272_exc", "NCT03198910_exc"]
  # 1,603 files use CRLF; offsets are mapped onto the LF text.
  assert sum(bool(d.meta.get("crlf")) for d in chia.documents) == 1603


def test_chia_entity_counts(chia):
  assert dict(chia.entity_counts()) == EXPECTED_ENTITIES
  assert set(EXPECTED_ENTITIES) == set(CHIA_ENTITY_TYPES)
  diff = {k: PUBLISHED_ENTITIES[k] - v for k, v in EXPECTED_ENTITIES.items()
          if PUBLISHED_ENTITIES[k] != v}
  assert diff == {"Condition": 1, "Measurement": 1, "Visit": 1}
  # 1,781 discontinuous mentions of kept types, one of them a bad span (NCT02137369_inc T8).
  assert sum(e.discontinuous for d in chia.documents for e in d.entities) == 1780


def test_chia_relation_counts(chia):
  got = chia.relation_counts()
  assert dict(got) == EXPECTED_RELATIONS
  assert set(got) == set(CHIA_RELATION_TYPES)
  for rtype, published in PUBLISHED_RELATIONS.items():
    lost = sum(v for k, v in chia.skipped.items()
               if k in (f"relation {rtype} with a dropped argument", f"self-relation {rtype}",
                        f"duplicate relation {rtype}"))
    assert got[rtype] == published - lost, rtype
  # data.md: "OR groups about 5,000"; 5,002 survive with >= 2 members in Document.meta.
  assert sum(len(d.meta.get("groups", ())) for d in chia.documents) == 5002


def test_chia_skipped(chia):
  assert dict(chia.skipped) == EXPECTED_SKIPPED
  assert sum(ERROR_LABELS.values()) == 2264
  assert sum(SPECIAL_LABELS.values()) == 1376


def test_chia_quirks_handled(chia):
  docs = {d.id: d for d in chia.documents}
  # Annotator dragged the span over "\r": after CRLF -> LF it ends right before "\n".
  d = docs["NCT01352598_inc"]
  e = d.entity("T31")
  assert e.text == "prostate cancer" == d.text[e.start:e.end] and d.text[e.end] == "\n"
  # Discontinuous mention with the head first: fragments keep file order.
  e = docs["NCT00344318_exc"].entity("T50")
  assert e.text == "reactions allergic" and e.fragments == ((1015, 1024), (995, 1003))
  # `*\tOR T5 T6 T7` becomes the chain T5-T6, T6-T7.
  rels = {(r.head, r.tail) for r in docs["NCT00050349_inc"].relations if r.type == "OR"}
  assert {("T5", "T6"), ("T6", "T7")} <= rels and ("T5", "T7") not in rels
  with pytest.raises(KeyError):
    docs["NCT03460002_inc"].entity("T5")


def test_chia_split_deterministic_and_disjoint(root, chia):
  ids = chia_trial_ids(root)
  assert ids == chia_trial_ids(root)
  # SHA-256 mod 10 buckets over the 1,000 ids: 806 / 95 / 99 trials (80.6/9.5/9.9 %).
  assert {k: len(v) for k, v in ids.items()} == {"train": 806, "dev": 95, "test": 99}
  sets = {k: set(v) for k, v in ids.items()}
  assert not (sets["train"] & sets["dev"] or sets["train"] & sets["test"]
              or sets["dev"] & sets["test"])
  assert set().union(*sets.values()) == {d.meta["trial"] for d in chia.documents}
  # Pinned with `printf %s NCT... | sha256sum` (mod 10: 7, 8, 9).
  assert [chia_split_of(n) for n in ("NCT00050349", "NCT03460002", "NCT02137369")] == [
      "train", "dev", "test"]
  for split in ("dev", "test"):
    part = load_chia(root, split)
    assert part.split == split
    assert [d.id for d in part.documents] == [
        d.id for d in chia.documents if chia_split_of(d.meta["trial"]) == split]
    assert len(part.documents) == 2 * len(ids[split])


def test_chia_bad_split_name(root):
  with pytest.raises(ValueError):
    load_chia(root, "validation")


# ------------------------------------------------------------------------- synthetic files


def write(tmp_path: Path, text: str | bytes, ann: str, name: str = "doc"):
  txt, ann_path = tmp_path / f"{name}.txt", tmp_path / f"{name}.ann"
  if isinstance(text, bytes):
    txt.write_bytes(text)
  else:
    txt.write_text(text, encoding="utf-8", newline="")
  ann_path.write_text(ann, encoding="utf-8", newline="")
  return txt, ann_path


TEXT = "no severe liver or kidney disease\r\nage > 18 years\r\n"
ANN = ("T1\tCondition 10 15;26 33\tliver disease\n"
       "T2\tCondition 19 33\tkidney disease\n"
       "T3\tQualifier 3 9\tsevere\n"
       "T4\tNegation 0 2\tno\n"
       "T5\tJunk 35 38\tage\n"
       "T6\tValue 39 49\t> 18 years\n"
       "T7\tMeasurement 35 38\tage\n"
       "R1\tHas_qualifier Arg1:T1 Arg2:T3\t\n"
       "R2\tHas_value Arg1:T5 Arg2:T6\n"
       "R3\tcausal Arg1:T1 Arg2:T2\n"
       "*\tOR T1 T2 T5 T4\n"
       "E1\tNeg:T4 Scope:T1 Scope2:T2\n"
       "A1\tSpeculated T1\n"
       "#1\tAnnotatorNotes T1\tchecked\n"
       "N1\tReference T2 UMLS:C0022658\tKidney Diseases\n"
       "R4\tHas_value Arg1:T7 Arg2:T6\n")


def test_read_brat_synthetic(tmp_path):
  txt, ann = write(tmp_path, TEXT, ANN)
  doc, counts = read_brat(txt, ann, drop_entity_types={"Junk"},
                          drop_relation_types={"causal"})
  assert doc.id == "doc" and doc.text == TEXT.replace("\r\n", "\n") and doc.meta["crlf"]
  t1 = doc.entity("T1")
  assert t1.fragments == ((10, 15), (26, 33)) and t1.text == "liver disease"
  assert doc.entity("T2").concept == "UMLS:C0022658"
  # After the first CRLF every offset moves back by one.
  t6 = doc.entity("T6")
  assert (t6.start, t6.end, t6.text) == (38, 48, "> 18 years")
  rels = {(r.type, r.head, r.tail) for r in doc.relations}
  assert rels == {("Has_qualifier", "T1", "T3"), ("Has_value", "T7", "T6"),
                  ("OR", "T1", "T2"), ("OR", "T2", "T4"),  # chain without dropped T5
                  ("Scope", "T4", "T1"), ("Scope2", "T4", "T2")}
  assert doc.meta["groups"] == (("OR", ("T1", "T2", "T4")),)
  assert counts == collections.Counter({
      "entity label Junk": 1, "relation Has_value with a dropped argument": 1,
      "relation label causal": 1, "OR groups read (* lines, not a skip)": 1,
      "OR group member dropped with its entity": 1, "attribute lines ignored": 1,
      "note lines ignored": 1})


def test_read_brat_label_sets(tmp_path):
  txt, ann = write(tmp_path, "aspirin daily", "T1\tDrug 0 7\taspirin\n"
                   "T2\tFrequency 8 13\tdaily\nR1\tHas_freq Arg1:T1 Arg2:T2\n")
  with pytest.raises(DataError, match=r"doc\.ann:2: .*unknown entity type 'Frequency'"):
    read_brat(txt, ann, entity_types={"Drug"})
  with pytest.raises(DataError, match=r"doc\.ann:3: .*unknown relation type 'Has_freq'"):
    read_brat(txt, ann, entity_types={"Drug", "Frequency"}, relation_types={"Has_dose"})


@pytest.mark.parametrize("ann, line, message", [
    ("T1\tDrug 0 7\taspirin\nT2\tDrug 8 99\tdaily\n", 2, "outside the text"),
    ("T1\tDrug 0 7\taspirin\nT2\tDrug 7 7\t\n", 2, "or empty"),
    ("T1\tDrug 0 7\taspirine\n", 1, "differs from the text"),
    ("T1\tDrug 0 7;8 13\taspirin\n", 1, "differs from the text"),
    ("T1\tDrug 0 7\taspirin\nR1\tHas_freq Arg1:T1 Arg2:T9\n", 2, "'T9' is not an entity"),
    ("T1\tDrug 0 7\taspirin\n*\tOR T1 T3\n", 2, "'T3' is not an entity"),
    ("T1\tDrug 0 7\taspirin\nT2\tDrug 8", 2, "malformed text-bound line"),  # truncated
    ("T1\tDrug 0 7\taspirin\nT2", 2, "truncated line"),
    ("T1\tDrug 0 x\taspirin\n", 1, "bad offsets"),
    ("T1\tDrug 0 7\taspirin\nT1\tDrug 0 7\taspirin\n", 2, "duplicate id"),
    ("T1\tDrug 0 7\taspirin\nR1\tHas_freq T1 T1\n", 2, "malformed relation line"),
    ("T1\tDrug 0 7\taspirin\n*\tOR T1\n", 2, "malformed group line"),
    ("T1\tDrug 0 7\taspirin\nE1\tNeg T1\n", 2, "malformed event line"),
    ("T1\tDrug 0 7\taspirin\nN1\tReference T7 DB:1\tx\n", 2, "normalization of unknown id"),
    ("T1\tDrug 0 7\taspirin\n\nX1\tfoo\n", 3, "unknown annotation line"),
])
def test_read_brat_malformed(tmp_path, ann, line, message):
  txt, ann_path = write(tmp_path, "aspirin daily", ann, name="bad")
  with pytest.raises(DataError) as info:
    read_brat(txt, ann_path)
  msg = str(info.value)
  assert msg.startswith(f"{ann_path}:{line}: ") and message in msg, msg


def test_read_brat_unreadable_text(tmp_path):
  txt, ann = write(tmp_path, b"caf\xe9", "", name="latin1")
  with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
    read_brat(txt, ann)
  with pytest.raises(DataError, match=r"missing\.txt: cannot read"):
    read_brat(tmp_path / "missing.txt", ann)


def test_read_brat_bad_spans(tmp_path):
  txt, ann = write(tmp_path, "aspirin daily", "T1\tDrug 0 7\taspirin\nT2\tDrug 8 13\tweekly\n"
                   "R1\tHas_freq Arg1:T1 Arg2:T2\n")
  doc, counts = read_brat(txt, ann, bad_spans={"T2": "typo"})
  assert [e.id for e in doc.entities] == ["T1"] and not doc.relations
  assert counts == {"entity with a bad span (typo)": 1,
                    "relation Has_freq with a dropped argument": 1}
  with pytest.raises(DataError, match=r"doc\.ann: document doc: entity 'T9' listed"):
    read_brat(txt, ann, bad_spans={"T9": "typo"})


def test_load_chia_file_checks(tmp_path):
  folder = tmp_path / "chia_without_scope"
  folder.mkdir()
  write(folder, "aspirin", "T1\tDrug 0 7\taspirin\n", name="NCT001_inc")
  write(folder, "", "", name="NCT001_exc")
  assert len(load_chia(tmp_path, "all").documents) == 2
  (folder / "NCT002_inc.txt").write_text("x")
  with pytest.raises(DataError, match=r"NCT002_inc\.txt: NCT002_inc\.ann is missing"):
    load_chia(tmp_path, "all")
  (folder / "NCT002_inc.ann").write_text("")
  with pytest.raises(DataError, match=r"trial NCT002 has only inc"):
    load_chia(tmp_path, "all")
  (folder / "NCT002_exc.txt").write_text("x")
  (folder / "NCT002_exc.ann").write_text("T1\tFrequency 0 1\tx\n")  # not a Chia label
  with pytest.raises(DataError, match=r"NCT002_exc\.ann:1: .*unknown entity type"):
    load_chia(tmp_path, "all")
