"""IOB reader (NCBI-disease, E3C preprocessed) and E3C UIMA CAS XMI reader."""

from __future__ import annotations

import collections

import pytest

from fedjax_lora.data import e3c_xmi, iob
from fedjax_lora.data.records import DataError
from tests.shared_data import require_shared

# ---------------------------------------------------------------- IOB, synthetic files


def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  return path


def test_iob_sentences_offsets_and_ids(tmp_path):
  path = _write(tmp_path, "toy.tsv",
                "Familial\tB-Disease\nbreast\tI-Disease\ncancer\tI-Disease\n.\tO\n\n"
                "No\tO\ndisease\tO\n\n\nAPC\tO\ngene\tB-Disease\n")  # no trailing blank line
  docs, skipped = iob.read_iob(path, label_set=["Disease"])
  assert [d.id for d in docs] == ["toy:0", "toy:1", "toy:2"]
  assert [d.line for d in docs] == [1, 6, 10]
  assert docs[0].text == "Familial breast cancer ."
  (e,) = docs[0].entities
  assert (e.start, e.end, e.type, e.text) == (0, 22, "Disease", "Familial breast cancer")
  assert docs[1].entities == ()
  assert docs[2].entities[0].text == "gene"
  assert docs[0].source == str(path) and not skipped


def test_iob_space_separator_detected_and_prefix(tmp_path):
  path = _write(tmp_path, "l1.txt", "a O\nfacial B-ety\npuffiness I-ety\nand O\nfever B-ety\n")
  docs, _ = iob.read_iob(path, doc_prefix="e3c")
  assert docs[0].id == "e3c:0"
  assert [e.text for e in docs[0].entities] == ["facial puffiness", "fever"]


def test_iob1_repair_counted_or_rejected(tmp_path):
  path = _write(tmp_path, "iob1.tsv", "x\tO\ny\tI-Disease\nz\tI-Disease\nw\tI-Chem\n")
  docs, skipped = iob.read_iob(path)
  assert [(e.type, e.text) for e in docs[0].entities] == [("Disease", "y z"), ("Chem", "w")]
  assert skipped == {iob.IOB1_REPAIR: 2}
  with pytest.raises(DataError, match=r"iob1\.tsv:2: .*IOB1"):
    iob.read_iob(path, repair_iob1=False)


@pytest.mark.parametrize("content, line, message", [
    ("a\tO\nb\tO\tX\n", 2, "column"),                  # three columns
    ("a\tO\n\nb\n", 3, "column"),                        # truncated line: no tag
    ("a\tO\nb\tE-Disease\n", 2, "unknown tag"),          # unknown prefix
    ("a\tO\nb\tB-\n", 2, "unknown tag"),                 # empty type
    ("a\tB-Chemical\n", 1, "unknown entity type"),       # outside label_set
])
def test_iob_malformed_lines_name_file_and_line(tmp_path, content, line, message):
  path = _write(tmp_path, "bad.tsv", content)
  with pytest.raises(DataError, match=rf"bad\.tsv:{line}: .*{message}"):
    iob.read_iob(path, "\t", label_set=["Disease"])


def test_iob_empty_and_undecodable_files(tmp_path):
  with pytest.raises(DataError, match=r"empty\.tsv.*no sentences"):
    iob.read_iob(_write(tmp_path, "empty.tsv", "\n\n"))
  path = tmp_path / "latin1.tsv"
  path.write_bytes(b"a\tO\n\ncaf\xe9\tO\n")
  with pytest.raises(DataError, match=r"latin1\.tsv:3: not UTF-8"):
    iob.read_iob(path)


def test_iob_bad_split_names():
  with pytest.raises(DataError, match="split"):
    iob.load_ncbi_disease("/nonexistent", "validation")
  with pytest.raises(DataError, match="split"):
    iob.load_e3c_iob("/nonexistent", "dev")


# ---------------------------------------------------------------- IOB, real corpora


@pytest.mark.parametrize("split, sentences, mentions", [
    ("train", 5424, 5134), ("dev", 923, 787), ("devel", 923, 787), ("test", 940, 960)])
def test_ncbi_disease_counts(split, sentences, mentions):
  """data.md §2.6: sentences 5,424 / 923 / 940, mentions 5,134 / 787 / 960."""
  root = require_shared("data", "raw", "ncbi_disease_iob")
  corpus = iob.load_ncbi_disease(root, split)
  assert len(corpus.documents) == sentences
  assert corpus.entity_counts() == {"Disease": mentions}
  assert not corpus.skipped  # strict IOB2: no I- without B-


def test_e3c_iob_counts():
  """Layer 1: 1,520 sentences (data.md) and 953 entities (the preprocessed README: the IOB
  drops the 51 CLINENTITY flagged DISCONTINUOUS and 20 nested/overlapping ones of the
  XMI's 1,024). Train/test sentence and entity shares counted from the files. Layer 2:
  2,873 sentences and 2,140 CLINENTITY (data.md), the same as the XMI."""
  root = require_shared("data", "raw", "e3c_en")
  train, test = iob.load_e3c_iob(root, "train"), iob.load_e3c_iob(root, "test")
  assert (len(train.documents), len(test.documents)) == (669, 851)
  assert (train.entity_counts()["ety"], test.entity_counts()["ety"]) == (437, 516)
  assert len(train.documents) + len(test.documents) == 1520
  assert train.entity_counts()["ety"] + test.entity_counts()["ety"] == 953
  # The XMI has 29,359 tokens (README Table 4); the IOB keeps every one of them.
  assert sum(d.meta["tokens"] for d in train.documents + test.documents) == 29359
  silver = iob.load_e3c_iob(root, "silver")
  assert len(silver.documents) == 2873
  assert silver.entity_counts() == {"ety": 2140}
  assert not (train.skipped or test.skipped or silver.skipped)


# ---------------------------------------------------------------- XMI, synthetic files

_HEAD = ('<?xml version="1.0" encoding="UTF-8"?><xmi:XMI xmlns:xmi="http://www.omg.org/XMI" '
         'xmlns:cas="http:///uima/cas.ecore" '
         'xmlns:type4="http:///de/tudarmstadt/ukp/dkpro/core/api/segmentation/type.ecore" '
         'xmlns:custom="http:///webanno/custom.ecore" xmi:version="2.0">\n'
         '    <cas:NULL xmi:id="0"/>\n')
_TEXT = "She had fever on 2012-08-12. Hb 10.9 g/dl, periorbital and facial oedema."


def _xmi(body: str, text: str = _TEXT, sofa: bool = True) -> str:
  tail = f'    <cas:Sofa xmi:id="12" sofaNum="1" sofaID="_InitialView" sofaString="{text}"/>\n'
  return _HEAD + body + (tail if sofa else "") + "</xmi:XMI>\n"


def _span(tag, xid, begin, end, extra=""):
  return f'    <custom:{tag} xmi:id="{xid}" sofa="12" begin="{begin}" end="{end}"{extra}/>\n'


def _link(tag, xid, role, target):
  return f'    <custom:{tag} xmi:id="{xid}" role="{role}" target="{target}"/>\n'


_GOOD = (
    '    <type4:Sentence xmi:id="2" sofa="12" begin="0" end="28"/>\n'
    '    <type4:Sentence xmi:id="3" sofa="12" begin="29" end="73"/>\n'
    + _span("ACTOR", 20, 0, 3, ' role="PATIENT"')
    + _span("EVENT", 21, 8, 13, ' TLINK="40 41" ALINK="42" docTimeRel="BEFORE"')
    + _span("CLINENTITY", 22, 8, 13, ' entityID="C0015967"')
    + _span("TIMEX3", 23, 17, 27, ' timexLink="43" timex3Class="DATE"')
    + _span("RML", 24, 32, 41, ' PERTAINSTO="44"')
    + _span("EVENT", 25, 29, 31, ' TLINK="45"')
    + _span("CLINENTITY", 26, 43, 72, ' discontinuous="DISCONTINUOUS" entityID="C0151205"')
    + _span("CLINENTITY", 27, 59, 72, ' discontinuous="C0542571"')   # CUI in the wrong field
    + _span("BODYPART", 28, 5, 5)                                      # zero length
    + _link("EVENTTLINKLink", 40, "CONTAINS", 25)
    + _link("EVENTTLINKLink", 41, "BEFORE", 21)                        # to itself
    + _link("EVENTALINKLink", 42, "INITIATES", 25)
    + _link("TIMEX3TimexLinkLink", 43, "CONTAINS", 21)
    + _link("RMLPERTAINSTOLink", 44, "PERTAINS", 25)
    + _link("EVENTTLINKLink", 45, "OVERLAP", 28)                       # to the zero-length one
    + _link("EVENTTLINKLink", 46, "BEFORE", 21))                       # referenced by nobody


def test_xmi_entities_relations_and_meta(tmp_path):
  path = _write(tmp_path, "EN000001.xml", _xmi(_GOOD))
  doc, skipped = e3c_xmi.read_e3c_xmi(path)
  assert doc.id == "EN000001" and doc.text == _TEXT and doc.source == str(path)
  got = {e.id: (e.type, e.text, e.concept) for e in doc.entities}
  assert got == {"20": ("ACTOR", "She", ""), "21": ("EVENT", "fever", ""),
                 "22": ("CLINENTITY", "fever", "C0015967"),
                 "23": ("TIMEX3", "2012-08-12", ""), "24": ("RML", "10.9 g/dl", ""),
                 "25": ("EVENT", "Hb", ""),
                 "26": ("CLINENTITY", "periorbital and facial oedema", "C0151205"),
                 "27": ("CLINENTITY", "facial oedema", "C0542571")}
  rels = {(r.head, r.tail, r.type, e3c_xmi.link_kind(r)) for r in doc.relations}
  assert rels == {("21", "25", "CONTAINS", "TLINK"), ("21", "25", "INITIATES", "ALINK"),
                  ("23", "21", "CONTAINS", "TIMEXLINK"), ("24", "25", "PERTAINS", "PERTAINSTO")}
  assert doc.meta["sentences"] == ((0, 28), (29, 73))
  assert doc.meta["discontinuous"] == ("26",)
  assert e3c_xmi.entity_attributes(doc)["21"] == {"docTimeRel": "BEFORE"}
  assert skipped == {
      "zero-length BODYPART annotation": 1, "TLINK from an annotation to itself": 1,
      "TLINK touching a skipped annotation": 1,
      "EVENTTLINKLink not referenced by any annotation": 1,
      "CLINENTITY CUI read from the 'discontinuous' attribute (no entityID)": 1}


def test_xmi_discontinuous_drop(tmp_path):
  path = _write(tmp_path, "EN000001.xml", _xmi(_GOOD))
  doc, skipped = e3c_xmi.read_e3c_xmi(path, discontinuous="drop")
  assert "26" not in {e.id for e in doc.entities} and doc.meta["discontinuous"] == ()
  assert skipped["CLINENTITY flagged DISCONTINUOUS (fragments not given)"] == 1


def test_xmi_id_shared_across_kinds_is_resolved(tmp_path):
  # As in EN100129: a CLINENTITY reuses the id of the Sofa and of a link element.
  body = (_span("CLINENTITY", 12, 8, 13, ' entityID="C0015967"')
          + _span("EVENT", 21, 8, 13, ' TLINK="30"') + _span("CLINENTITY", 30, 0, 3)
          + _span("EVENT", 25, 29, 31) + _link("EVENTTLINKLink", 30, "BEFORE", 25))
  doc, skipped = e3c_xmi.read_e3c_xmi(_write(tmp_path, "EN2.xml", _xmi(body)))
  assert [(r.head, r.tail) for r in doc.relations] == [("21", "25")]
  assert skipped["xmi:id reused by elements of different kinds (resolved by kind)"] == 2


@pytest.mark.parametrize("body, line, message", [
    (_span("EVENT", 21, 8, 99), 3, r"\(xmi:id 21\) EVENT: offsets 8-99 outside the text"),
    (_span("EVENT", 21, 9, 8), 3, "offsets 9-8"),
    (_span("EVENT", 21, "x", 8), 3, "not integers"),
    (_span("EVENT", 21, 8, 13, ' TLINK="77"'), 3, "refers to xmi:id 77, which is nothing"),
    (_span("EVENT", 21, 8, 13, ' TLINK="22"') + _span("RML", 22, 0, 3), 3,
     "which is RML, not a custom:EVENTTLINKLink"),
    (_span("EVENT", 21, 8, 13, ' TLINK="40"') + _link("EVENTTLINKLink", 40, "BEFORE", 2)
     + '    <type4:Sentence xmi:id="2" sofa="12" begin="0" end="28"/>\n', 4,
     "target '2' is Sentence"),
    (_span("EVENT", 21, 8, 13, ' TLINK="40"') + _link("EVENTTLINKLink", 40, "CAUSES", 21), 4,
     "role 'CAUSES'"),
    (_span("EVENT", 21, 8, 13, ' ALINK="40"') + _link("EVENTALINKLink", 40, "BEFORE", 21), 4,
     "role 'BEFORE' is not one of INITIATES"),
    (_span("DRUG", 21, 8, 13), 3, "unknown annotation type custom:DRUG"),
    (_span("EVENT", 21, 8, 13) + _span("ACTOR", 21, 0, 3), 3, "duplicate xmi:id"),
    (_span("EVENT", 21, 8, 13).replace('sofa="12"', 'sofa="5"'), 3, "sofa '5'"),
])
def test_xmi_bad_annotations_name_file_line_and_id(tmp_path, body, line, message):
  path = _write(tmp_path, "EN000009.xml", _xmi(body))
  with pytest.raises(DataError, match=rf"EN000009\.xml:{line}: document EN000009: .*{message}"):
    e3c_xmi.read_e3c_xmi(path)


def test_xmi_invalid_or_truncated_xml(tmp_path):
  whole = _xmi(_GOOD)
  path = _write(tmp_path, "EN000010.xml", whole[: len(whole) // 2])
  with pytest.raises(DataError, match=r"EN000010\.xml:\d+: document EN000010: invalid XML"):
    e3c_xmi.read_e3c_xmi(path)
  path = _write(tmp_path, "EN000011.xml", _xmi(_span("EVENT", 21, 8, 13), sofa=False))
  with pytest.raises(DataError, match=r"EN000011\.xml: document EN000011: .*cas:Sofa"):
    e3c_xmi.read_e3c_xmi(path)


def test_load_e3c_split_file_checks(tmp_path):
  layer1 = tmp_path / "data_annotation" / "English" / "layer1"
  layer1.mkdir(parents=True)
  (tmp_path / "documentation").mkdir()
  split = _write(tmp_path / "documentation", "train_test_split.txt",
                 "intro\n\nBASQUE\n'EU1', 'EU2'\n\nENGLISH\n'EN000001', 'EN000002'\n")
  _write(layer1, "EN000001.xml", _xmi(_GOOD))
  _write(layer1, "EN000003.xml", _xmi(_GOOD))
  with pytest.raises(DataError, match=r"train_test_split\.txt.*EN000002"):
    e3c_xmi.load_e3c(tmp_path, "train")
  split.write_text("ENGLISH\n'EN000001'\n", encoding="utf-8")
  assert [d.id for d in e3c_xmi.load_e3c(tmp_path, "train").documents] == ["EN000001"]
  assert [d.id for d in e3c_xmi.load_e3c(tmp_path, "test").documents] == ["EN000003"]
  split.write_text("ENGLISH\n\nFRENCH\n'FR1'\n", encoding="utf-8")
  with pytest.raises(DataError, match=r"train_test_split\.txt:3: no quoted document ids"):
    e3c_xmi.load_e3c(tmp_path, "train")
  with pytest.raises(DataError, match="layer"):
    e3c_xmi.load_e3c(tmp_path, "train", layer=3)


# ---------------------------------------------------------------- XMI, real corpus


@pytest.fixture(scope="module")
def layer1():
  root = require_shared("data", "raw", "e3c_en")
  return e3c_xmi.load_e3c(root, "train"), e3c_xmi.load_e3c(root, "test")


def test_e3c_layer1_documents_and_entities(layer1):
  train, test = layer1
  root = require_shared("data", "raw", "e3c_en")
  official = e3c_xmi.official_train_ids(root / "documentation" / "train_test_split.txt")
  assert sorted(d.id for d in train.documents) == sorted(official)
  assert (len(train.documents), len(test.documents)) == (36, 48)
  assert not {d.id for d in train.documents} & {d.id for d in test.documents}
  # data.md §2.3 / README Table 4, exactly.
  total = train.entity_counts() + test.entity_counts()
  assert total == {"EVENT": 4885, "CLINENTITY": 1024, "BODYPART": 968, "ACTOR": 682,
                   "RML": 480, "TIMEX3": 380}
  # Train share, counted independently with grep over the 36 official files.
  assert (train.entity_counts()["CLINENTITY"], train.entity_counts()["EVENT"]) == (463, 2042)
  docs = train.documents + test.documents
  assert sum(len(d.meta["sentences"]) for d in docs) == 1520
  # README Table 4.1 counts 65 "DISCONTINUOUS" CLINENTITY: that is every use of the
  # `discontinuous` attribute, but 14 of those hold a CUI typed into the wrong field on a
  # contiguous span; 51 carry the DISCONTINUOUS flag.
  assert sum(len(d.meta["discontinuous"]) for d in docs) == 51
  concepts = collections.Counter(bool(e.concept) for d in docs for e in d.entities
                                 if e.type == "CLINENTITY")
  # 46 without a CUI: 30 with no CUI anywhere, 13 entityID="CUILESS", 3 malformed ids.
  assert concepts == {True: 978, False: 46}


def test_e3c_layer1_relations(layer1):
  train, test = layer1
  kinds = collections.Counter(e3c_xmi.link_kind(r)
                              for d in train.documents + test.documents for r in d.relations)
  # data.md: TLINK 4,350 (EVENTTLINKLink elements), ALINK 114, PERTAINS 541. One TLINK in
  # EN100497 (train) links "scan" BEFORE itself and is skipped and counted: 4,349. The 502
  # TIMEX3TimexLinkLink (README Table 4) are TLINKs from time expressions, kept as TIMEXLINK.
  assert kinds == {"TLINK": 4349, "TIMEXLINK": 502, "ALINK": 114, "PERTAINSTO": 541}
  assert train.skipped["TLINK from an annotation to itself"] == 1
  types = train.relation_counts() + test.relation_counts()
  assert types["PERTAINS"] == 541
  assert sum(types[t] for t in e3c_xmi.ALINK_TYPES) == 114
  assert sum(types[t] for t in e3c_xmi.TLINK_TYPES) == 4349 + 502
  # EN100129, EN100340, EN100376, EN100682 reuse 7 xmi:ids across element kinds.
  skipped = train.skipped + test.skipped
  assert skipped["xmi:id reused by elements of different kinds (resolved by kind)"] == 7
  assert not any("not referenced" in k or "skipped annotation" in k for k in skipped)


def test_e3c_layer2_silver_and_validated():
  root = require_shared("data", "raw", "e3c_en")
  validated = e3c_xmi.load_e3c(root, "validated", layer=2)
  silver = e3c_xmi.load_e3c(root, "silver", layer=2)
  # data.md: 171 layer-2 docs with 2,140 CLINENTITY; 19 validated docs, README Table 6:
  # 254 manually annotated CLINENTITY.
  assert len(validated.documents) == 19
  assert validated.entity_counts() == {"CLINENTITY": 254}
  assert not {d.id for d in silver.documents} & {d.id for d in validated.documents}
  assert len(silver.documents) + len(validated.documents) == 171
  # 2,140 silver mentions minus the 234 silver mentions of the 19 validated docs (grep).
  assert silver.entity_counts() == {"CLINENTITY": 2140 - 234}
  everything = e3c_xmi.load_e3c(root, "all", layer=2)
  assert len(everything.documents) == 171
  assert everything.entity_counts() == {"CLINENTITY": 2140}
  assert sum(len(d.meta["sentences"]) for d in everything.documents) == 2873
  assert silver.skipped == {
      "layer-2 silver document held out (its gold version is split 'validated')": 19}
  assert all(not d.relations for d in silver.documents + validated.documents)
  assert sum(len(d.meta["sentences"]) for d in validated.documents) == 334  # README Table 6
