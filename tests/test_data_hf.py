"""Hugging Face `datasets` input: BIO (ClassLabel or string tags) and text + spans layouts."""

import datasets
import pytest

from fedjax_lora.data import corpora, hf_dataset
from fedjax_lora.data.records import DataError


def _bio():
  features = datasets.Features({
      "id": datasets.Value("string"),
      "tokens": datasets.Sequence(datasets.Value("string")),
      "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-Drug", "I-Drug"]))})
  return datasets.Dataset.from_dict(
      {"id": ["a", "b"], "tokens": [["Took", "acetyl", "salicylic", "acid", "."], ["None"]],
       "ner_tags": [[0, 1, 2, 2, 0], [0]]}, features=features)


def test_bio_dataset_with_classlabel_tags():
  corpus = hf_dataset.from_hf_dataset(_bio(), "toy")
  a, b = corpus.documents
  assert a.text == "Took acetyl salicylic acid ."
  assert [(e.text, e.type) for e in a.entities] == [("acetyl salicylic acid", "Drug")]
  assert b.entities == ()


def test_span_dataset_with_relations_saved_to_disk(tmp_path):
  ds = datasets.DatasetDict({"test": datasets.Dataset.from_list([{
      "id": "n1", "text": "Metformin 500 mg daily.",
      "entities": [{"start": 0, "end": 9, "type": "drug", "text": "Metformin"},
                   {"start": 10, "end": 16, "type": "dosage", "text": "500 mg"}],
      "relations": [{"head": 0, "tail": 1, "type": "dosage"}]}])})
  ds.save_to_disk(str(tmp_path / "ds"))
  corpus = corpora.load_corpus(f"hf:{tmp_path / 'ds'}", "test")
  (doc,) = corpus.documents
  (rel,) = doc.relations
  assert doc.entity(rel.head).text == "Metformin" and doc.entity(rel.tail).text == "500 mg"


@pytest.mark.parametrize("row,needle", [
    ({"id": "x", "text": "abc", "entities": [{"start": 0, "end": 9, "type": "d", "text": "abc"}],
      "relations": []}, "outside the text"),
    ({"id": "x", "text": "abc", "entities": [{"start": 0, "end": 2, "type": "d", "text": "abc"}],
      "relations": []}, "differs from the text"),
    ({"id": "x", "text": "abc", "entities": [{"start": 0, "end": 2, "type": "d", "text": "ab"}],
      "relations": [{"head": 0, "tail": 7, "type": "r"}]}, "is not an entity"),
])
def test_bad_rows_name_dataset_and_row(row, needle):
  ds = datasets.Dataset.from_list([row])
  with pytest.raises(DataError, match=needle) as err:
    hf_dataset.from_hf_dataset(ds, "toy")
  assert "hf:toy[train] row:1" in str(err.value)


def test_unrecognised_columns_and_missing_split(tmp_path):
  with pytest.raises(DataError, match="have neither"):
    hf_dataset.from_hf_dataset(datasets.Dataset.from_dict({"foo": [1]}), "toy")
  datasets.DatasetDict({"train": _bio()}).save_to_disk(str(tmp_path / "d"))
  with pytest.raises(DataError, match="no split 'test'"):
    hf_dataset.load_hf(tmp_path / "d", "test")
