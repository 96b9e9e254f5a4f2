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
