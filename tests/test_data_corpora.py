"""Every real corpus: record -> HTML target -> parser gives back the same spans; dedup counts.

Also corpora given as <format>:<PATH> (pubtator, brat, iob) on files built in tmp_path.
"""

import pytest

from fedjax_lora.data import corpora, dedup, markup, tasks, windows
from fedjax_lora.data.records import DataError
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


# ------------------------------------------------ bring your own corpus: <format>:<PATH>

_PUBTATOR = ("{pmid}|t|Aspirin causes fever and chills.\n{pmid}|a|Rare.\n"
             "{pmid}\t0\t7\tAspirin\tChemical\tD001241\n"
             "{pmid}\t15\t31\tfever and chills\tDisease\tD005334|D023341\tfever|chills\n"
             "{pmid}\tCID\tD001241\tD023341\n\n")


def _brat_doc(folder, name, text, ann):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{name}.txt").write_text(text)
  (folder / f"{name}.ann").write_text(ann)


def _brat_tree(root):
  ann = "T1\tDrug 0 7\tAspirin\nT2\tEffect 15 23\tbleeding\nR1\tcauses Arg1:T1 Arg2:T2\n"
  _brat_doc(root / "train", "a", "Aspirin causes bleeding.", ann)
  _brat_doc(root / "train" / "ward2", "b", "Aspirin causes bleeding again.", ann)
  _brat_doc(root / "test", "c", "Aspirin causes bleeding in the test.", ann)
  (root / "annotation.conf").write_text("[entities]\nDrug\nEffect\n")


def test_pubtator_folder_by_split_name(tmp_path):
  (tmp_path / "Train.PubTator").write_text(_PUBTATOR.format(pmid=1) + _PUBTATOR.format(pmid=2))
  (tmp_path / "test.txt").write_text(_PUBTATOR.format(pmid=3))
  (tmp_path / "README.md").write_text("not a split")
  corpus = corpora.load_corpus(f"pubtator:{tmp_path}", "train")
  assert corpus.name == f"pubtator:{tmp_path}" and corpus.split == "train"
  assert [d.id for d in corpus.documents] == ["1", "2"]
  doc = corpus.documents[0]
  assert [(doc.entity(r.head).text, doc.entity(r.tail).text, r.type) for r in doc.relations] \
      == [("Aspirin", "fever and chills", "CID")]
  assert [d.id for d in corpora.load_corpus(f"pubtator:{tmp_path}", "test").documents] == ["3"]


def test_iob_split_template_and_single_file(tmp_path):
  for split, token in (("train", "asthma"), ("dev", "gout")):
    (tmp_path / f"ncbi_{split}.tsv").write_text(f"Severe\tO\n{token}\tB-Disease\n.\tO\n\n"
                                                 f"No\tO\nfever\tB-Disease\n")
  corpus = corpora.load_corpus(f"iob:{tmp_path}/ncbi_{{split}}.tsv", "dev")
  assert [d.text for d in corpus.documents] == ["Severe gout .", "No fever"]
  assert [e.text for d in corpus.documents for e in d.entities] == ["gout", "fever"]
  one = corpora.load_corpus(f"iob:{tmp_path / 'ncbi_train.tsv'}", "test")
  assert one.documents[0].entities[0].text == "asthma"
  assert corpora.single_collection(f"iob:{tmp_path / 'ncbi_train.tsv'}")
  assert not corpora.single_collection(f"iob:{tmp_path}/ncbi_{{split}}.tsv")


def test_brat_folder_per_split(tmp_path):
  _brat_tree(tmp_path)
  corpus = corpora.load_corpus(f"brat:{tmp_path}", "train")
  assert [d.id for d in corpus.documents] == ["a", "ward2/b"]
  doc = corpus.documents[1]
  assert [(e.type, e.text) for e in doc.entities] == [("Drug", "Aspirin"), ("Effect", "bleeding")]
  assert [(r.head, r.tail, r.type) for r in doc.relations] == [("T1", "T2", "causes")]
  assert not corpora.single_collection(f"brat:{tmp_path}")
  # A folder holding the documents themselves is one collection.
  assert corpora.load_corpus(f"brat:{tmp_path / 'test'}", "test").documents[0].id == "c"
  assert corpora.single_collection(f"brat:{tmp_path / 'test'}")


@pytest.mark.parametrize("fmt,needle", [
    ("pubtator", r"no split 'dev' in .*: expected one file named dev\.<ext> \(e\.g\. "
                 r"dev\.PubTator\); found: Train\.PubTator"),
    ("iob", r"no split 'dev' in .*: expected one file named dev\.<ext>"),
    ("brat", r"no split 'dev' in .*: expected a subfolder dev/ holding \.txt/\.ann pairs; "
             r"found: test, train"),
])
def test_missing_split_names_what_was_expected(tmp_path, fmt, needle):
  if fmt == "brat":
    _brat_tree(tmp_path)
  else:
    (tmp_path / "Train.PubTator").write_text(_PUBTATOR.format(pmid=1))
  with pytest.raises(DataError, match=needle):
    corpora.load_corpus(f"{fmt}:{tmp_path}", "dev")


def test_path_corpus_errors(tmp_path):
  (tmp_path / "train.tsv").write_text("a\tO\n")
  (tmp_path / "train.old.tsv").write_text("a\tO\n")
  with pytest.raises(DataError, match=r"split 'train' is ambiguous .*train\.old\.tsv, "
                                      r"train\.tsv; keep one"):
    corpora.load_corpus(f"iob:{tmp_path}", "train")
  with pytest.raises(DataError, match=r"missing.*not found"):
    corpora.load_corpus(f"pubtator:{tmp_path / 'missing'}", "train")
  with pytest.raises(DataError, match=r"split 'test': file .*test\.tsv not found"):
    corpora.load_corpus(f"iob:{tmp_path}/{{split}}.tsv", "test")
  with pytest.raises(DataError, match=r"pubtator:<path>"):
    corpora.load_corpus("pubtater:/x", "train")


def test_path_corpus_bad_line_names_file_and_line(tmp_path):
  (tmp_path / "dev.tsv").write_text("Severe\tO\ngout\tB-Disease\textra\n")
  with pytest.raises(DataError, match=r"dev\.tsv:2: expected `token"):
    corpora.load_corpus(f"iob:{tmp_path}", "dev")
  (tmp_path / "train.PubTator").write_text(_PUBTATOR.format(pmid=1).replace("D023341\n",
                                                                           "D999\n"))
  with pytest.raises(DataError, match=r"train\.PubTator:5: document 1: relation argument 'D999'"):
    corpora.load_corpus(f"pubtator:{tmp_path}", "train")
  _brat_tree(tmp_path / "b")
  (tmp_path / "b" / "train" / "a.txt").unlink()
  with pytest.raises(DataError, match=r"train/a\.ann: a\.txt is missing"):
    corpora.load_corpus(f"brat:{tmp_path / 'b'}", "train")
