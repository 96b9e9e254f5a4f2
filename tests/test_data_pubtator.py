"""PubTator reader: BioRED counts from data.md §2.5, concept-level relations, bad input."""

import collections

import pytest

from fedjax_lora.data import pubtator
from fedjax_lora.data.records import DataError
from tests.shared_data import require_shared


@pytest.fixture(scope="module")
def biored():
  root = require_shared("data", "raw", "biored")
  return {s: pubtator.load_biored(root, s) for s in ("train", "dev", "test")}


def test_biored_published_counts(biored):
  docs = {s: len(c.documents) for s, c in biored.items()}
  mentions = {s: sum(c.entity_counts().values()) for s, c in biored.items()}
  concept_rels = {s: pubtator.concept_relation_count(c) for s, c in biored.items()}
  assert docs == {"train": 400, "dev": 100, "test": 100}
  assert mentions == {"train": 13351, "dev": 3533, "test": 3535}
  assert concept_rels == {"train": 4178, "dev": 1162, "test": 1163}
  total = sum((c.entity_counts() for c in biored.values()), collections.Counter())
  assert total == {"GeneOrGeneProduct": 6697, "DiseaseOrPhenotypicFeature": 5545,
                   "ChemicalEntity": 4429, "OrganismTaxon": 2192, "SequenceVariant": 1381,
                   "CellLine": 175}
  types = collections.Counter()
  for c in biored.values():
    for d in c.documents:
      seen = {}
      for r in d.relations:
        seen[r.id] = r.type
      types.update(seen.values())
  assert types == {"Association": 3387, "Positive_Correlation": 1766,
                   "Negative_Correlation": 1150, "Bind": 89, "Cotreatment": 55, "Comparison": 39,
                   "Drug_Interaction": 13, "Conversion": 4}


def test_biored_offsets_cover_title_and_abstract(biored):
  doc = biored["train"].documents[0]
  assert doc.text[doc.meta["title_length"]] == " "
  # Every mention of an abstract lies after the title.
  assert any(e.start > doc.meta["title_length"] for e in doc.entities)
  for e in doc.entities:
    assert doc.text[e.start:e.end] == e.text


def test_relation_pairs_expand_concepts(tmp_path):
  path = tmp_path / "x.PubTator"
  path.write_text("1|t|Aspirin and warfarin.\n1|a|Warfarin bleeding.\n"
                  "1\t0\t7\tAspirin\tChemical\tD1\n"
                  "1\t12\t20\twarfarin\tChemical\tD2\n"
                  "1\t22\t30\tWarfarin\tChemical\tD2\n"
                  "1\t31\t39\tbleeding\tDisease\tD3,D4\n"
                  "1\tCID\tD2\tD4\n\n")
  docs, skipped = pubtator.read_pubtator(path)
  (doc,) = docs
  pairs = {(doc.entity(r.head).text, doc.entity(r.tail).text) for r in doc.relations}
  assert pairs == {("warfarin", "bleeding"), ("Warfarin", "bleeding")}
  assert {r.id for r in doc.relations} == {"R1"} and doc.meta["concept_relations"] == 1
  assert not skipped


@pytest.mark.parametrize("body,needle", [
    ("1|t|Aspirin.\n1|a|x\n1\t0\t40\tAspirin\tChemical\tD1\n", "outside the text"),
    ("1|t|Aspirin.\n1|a|x\n1\t0\t7\tAspirim\tChemical\tD1\n", "differs from the text"),
    ("1|t|Aspirin.\n1|a|x\n1\t0\t7\tAspirin\tChemical\tD1\n1\tCID\tD1\tD9\n", "'D9'"),
    ("1|t|Aspirin.\n1|a|x\n1\t0\tseven\n", "expected a mention line"),
    ("1|t|Aspirin.\n", "no abstract"),
    ("1|t|Aspirin.\n1|a|x\n2\t0\t7\tAspirin\tChemical\tD1\n", "belongs to PMID '2'"),
])
def test_bad_pubtator_names_file_and_line(tmp_path, body, needle):
  path = tmp_path / "bad.PubTator"
  path.write_text(body)
  with pytest.raises(DataError, match=needle) as err:
    pubtator.read_pubtator(path)
  assert f"{path}:" in str(err.value)


def test_unknown_label_rejected(tmp_path):
  path = tmp_path / "l.PubTator"
  path.write_text("1|t|Aspirin.\n1|a|x\n1\t0\t7\tAspirin\tDrugz\tD1\n")
  with pytest.raises(DataError, match=r"l.PubTator:3: .*unknown entity type 'Drugz'"):
    pubtator.read_pubtator(path, entity_types=pubtator.BIORED_ENTITY_TYPES)


# BC5CDR style: `|`-separated composite ids with a column of part texts, CID relations to
# one part, and `-1` for a mention no concept was found for.
_CDR = ("7|t|Drug X caused fever and chills.\n"
        "7|a|Rash was seen.\n"
        "7\t0\t6\tDrug X\tChemical\tD001\n"
        "7\t14\t30\tfever and chills\tDisease\tD006470|D003556\tfever|chills\n"
        "7\t32\t36\tRash\tDisease\t-1\n"
        "7\tCID\tD001\tD003556\n\n")


def test_bc5cdr_composite_mention_and_cid_relation(tmp_path):
  path = tmp_path / "cdr.PubTator"
  path.write_text(_CDR)
  docs, skipped = pubtator.read_pubtator(path, pubtator.BC5CDR_ENTITY_TYPES,
                                         pubtator.BC5CDR_RELATION_TYPES)
  (doc,) = docs
  composite = next(e for e in doc.entities if e.text == "fever and chills")
  assert composite.concept_ids == ("D006470", "D003556")
  assert doc.meta["mention_parts"] == {composite.id: ("fever", "chills")}
  # The CID relation names one part; it becomes a relation to the composite mention.
  assert [(doc.entity(r.head).text, doc.entity(r.tail).text, r.type, r.id)
          for r in doc.relations] == [("Drug X", "fever and chills", "CID", "R1")]
  assert doc.meta["relation_concepts"] == {"R1": ("D001", "D003556")}
  assert skipped == {"mentions without a concept id (-1; kept as entities, not a skip)": 1}


def test_unnormalised_mention_is_an_entity_without_concept(tmp_path):
  path = tmp_path / "cdr.PubTator"
  path.write_text(_CDR)
  (doc,), _ = pubtator.read_pubtator(path)
  rash = next(e for e in doc.entities if e.text == "Rash")
  assert rash.type == "Disease" and rash.concept == "" and rash.concept_ids == ()
  assert all(rash.id not in (r.head, r.tail) for r in doc.relations)


def test_relation_to_unnormalised_id_names_file_and_line(tmp_path):
  path = tmp_path / "cdr.PubTator"
  path.write_text(_CDR.replace("7\tCID\tD001\tD003556", "7\tCID\tD001\t-1"))
  with pytest.raises(DataError, match=r"cdr.PubTator:6: .*'-1' marks an unnormalised"):
    pubtator.read_pubtator(path)


def test_part_count_mismatch_is_counted_not_fatal(tmp_path):
  path = tmp_path / "cdr.PubTator"
  path.write_text(_CDR.replace("\tfever|chills", "\tfever and chills"))
  (doc,), skipped = pubtator.read_pubtator(path)
  assert len(doc.relations) == 1
  assert skipped["composite mentions whose part texts and concept ids differ in number "
                 "(ids kept)"] == 1


def test_biored_comma_ids_and_novelty_still_read(tmp_path):
  path = tmp_path / "b.PubTator"
  path.write_text("5|t|BRCA1 and BRCA2 in cancer.\n5|a|x\n"
                  "5\t0\t15\tBRCA1 and BRCA2\tGeneOrGeneProduct\t672,675\n"
                  "5\t19\t25\tcancer\tDiseaseOrPhenotypicFeature\tD009369\n"
                  "5\tAssociation\t675\tD009369\tNovel\n\n")
  (doc,), skipped = pubtator.read_pubtator(path, pubtator.BIORED_ENTITY_TYPES,
                                           pubtator.BIORED_RELATION_TYPES)
  assert doc.entities[0].concept_ids == ("672", "675")
  assert [(doc.entity(r.head).text, doc.entity(r.tail).text) for r in doc.relations] == \
      [("BRCA1 and BRCA2", "cancer")]
  assert doc.meta["novelty"] == {"R1": "Novel"} and "mention_parts" not in doc.meta
  assert not skipped


def test_relation_to_unknown_part_id_names_file_and_line(tmp_path):
  path = tmp_path / "cdr.PubTator"
  path.write_text(_CDR.replace("7\tCID\tD001\tD003556", "7\tCID\tD001\tD009999"))
  with pytest.raises(DataError, match=r"cdr.PubTator:6: document 7: relation argument "
                                      r"'D009999' is not the concept id of any mention"):
    pubtator.read_pubtator(path)


def test_biored_whole_composite_and_tmvar_ids(tmp_path):
  # BioRED relates a `|` composite by its whole id string, and tmVar variant ids contain
  # `|` without being composites.
  path = tmp_path / "b.PubTator"
  path.write_text("6|t|V600E and memory loss.\n6|a|x\n"
                  "6\t0\t5\tV600E\tSequenceVariant\tp|SUB|V|600|E\n"
                  "6\t10\t21\tmemory loss\tDiseaseOrPhenotypicFeature\tD007859|D008569\n"
                  "6\tAssociation\tp|SUB|V|600|E\tD007859|D008569\tNovel\n\n")
  (doc,), _ = pubtator.read_pubtator(path)
  variant, disease = doc.entities
  assert variant.concept_ids == ("p|SUB|V|600|E",)
  assert disease.concept_ids == ("D007859", "D008569")
  assert disease.concept_keys == ("D007859", "D008569", "D007859|D008569")
  assert [(r.head, r.tail) for r in doc.relations] == [(variant.id, disease.id)]
