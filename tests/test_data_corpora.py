"""Every real corpus: record -> HTML target -> parser gives back the same spans; dedup counts."""

import pytest

from fedjax_lora.data import corpora, dedup, markup, tasks, windows
from tests.shared_data import require_shared

CORPUS_SPLITS = [("biored", "dev"), ("chia", "dev"), ("ddi", "dev"), ("phee", "dev"),
                 ("e3c", "train"), ("e3c_layer2", "validated"), ("e3c_iob", "train"),
                 ("ncbi_disease", "dev")]


@pytest.mark.parametrize("name,split", CORPUS_SPLITS)
def test_html_round_trip_for_every_corpus(name, split):
  require_shared("data", "raw", corpora.CORPORA[name].folder)
  corpus = corpora.load_corpus(name, split)
  docs = corpus.documents[:150]
  spec = tasks.LabelSpec()
  wins = [w for d in docs for w in windows.split_document(d, 200, "sentence")]
  labels = tasks.source_labels(wins, spec)
  report = tasks.TaskReport()
  examples = tasks.build_examples(name, wins, ["ner", "re"], spec, labels, report)
  assert any(e.task == "ner" and e.spans for e in examples)
  for ex in examples:
    parsed = markup.parse(ex.target)
    assert parsed.text == ex.text, ex.doc_id
    assert sorted(parsed.spans) == sorted(ex.spans + ex.anchors), ex.doc_id
    assert not parsed.problems
  # What could not be expressed is counted, and only for the reasons the format forces.
  allowed = ("overlapping", "discontinuous", "nothing expressible", "overlapping its anchor")
  assert all(any(a in reason for a in allowed) for reason in report.counts), report.counts


def _all(name, splits):
  return [d for s in splits for d in corpora.load_corpus(name, s).documents]


def test_cross_corpus_duplicates_match_data_md():
  for folder in ("phee", "ddi", "biored", "ncbi_disease_iob"):
    require_shared("data", "raw", folder)
  phee = _all("phee", ("train", "dev", "test"))
  ddi = _all("ddi", ("train", "dev", "test", "ner_test"))
  biored = _all("biored", ("train", "dev", "test"))
  ncbi = _all("ncbi_disease", ("train", "dev", "test"))
  pmids = lambda docs: {dedup.pmid(d) for d in docs} - {None}
  assert len(pmids(phee) & pmids(ddi)) == 24  # data.md §4.4
  assert len(pmids(phee) & pmids(biored)) == 3
  # "about 12" abstracts by text match; our sentence matching finds 11.
  assert len(dedup.overlapping(biored, ncbi)) == 11
  twins = dedup.overlapping(phee, ddi)
  assert {dedup.pmid(d) for d in phee if d.id in twins} == pmids(phee) & pmids(ddi)
