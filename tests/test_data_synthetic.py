"""The embedded synthetic sites: deterministic, valid, disjoint, and measurably different."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_lora.data import synthetic as syn
from fedjax_lora.data.records import validate_document

REPO = Path(__file__).resolve().parents[1]
ANCHORS = {"problem", "drug", "test", "treatment"}


@pytest.fixture(scope="module")
def sites():
  return syn.synthetic_sites()


def _digest(sites) -> str:
  rows = [(d.id, d.text, d.source, d.line, dict(d.meta),
           [(e.id, e.start, e.end, e.type, e.text) for e in d.entities],
           [(r.id, r.head, r.tail, r.type) for r in d.relations])
          for splits in sites.values() for c in splits.values() for d in c.documents]
  return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _all_docs(sites):
  return [d for splits in sites.values() for c in splits.values() for d in c.documents]


def _tv(a: collections.Counter, b: collections.Counter, keys) -> float:
  ta, tb = sum(a[k] for k in keys), sum(b[k] for k in keys)
  return 0.5 * sum(abs(a[k] / ta - b[k] / tb) for k in keys)


def test_lexicon_keys_exist():
  for _, _, _, _, indications in syn.DRUGS:
    assert set(indications) <= set(syn.PROBLEMS)
  for _, findings in syn.TESTS + syn.IMAGING_SITES:
    assert set(findings) <= set(syn.PROBLEMS)
  tables = (list(syn.PROBLEMS.values()) + list(syn.LOCAL_PROBLEMS.values()) + list(syn.BODYLOCS)
            + list(syn.IMAGING) + list(syn.ROUTES.values()) + list(syn.FREQS.values())
            + [d[0] for d in syn.DRUGS] + [t[0] for t in syn.TREATMENTS]
            + [t[0] for t in syn.TESTS] + [lab[0] for lab in syn.LABS])
  assert all(len(forms) == len(syn.STYLES) for forms in tables)


def test_default_sizes_and_fields(sites):
  assert list(sites) == [name for name, _ in syn.DEFAULT_SITES]
  for (name, style), sizes in zip(syn.DEFAULT_SITES, syn.DEFAULT_DOCS_PER_SITE):
    assert list(sites[name]) == list(syn.SPLITS)
    for split, n in zip(syn.SPLITS, sizes):
      corpus = sites[name][split]
      assert (corpus.name, corpus.split, len(corpus.documents)) == (f"synthetic/{name}", split, n)
      assert not corpus.skipped
      for i, d in enumerate(corpus.documents):
        assert d.source == f"synthetic:{name}" and d.line == i + 1
        assert dict(d.meta) == {"site": name, "style": style}


def test_same_seed_same_corpus_across_processes(sites):
  assert syn.synthetic_sites() == sites
  code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.test_data_synthetic import "
          "_digest; from fedjax_lora.data import synthetic; "
          "print(_digest(synthetic.synthetic_sites()))")
  env = dict(os.environ, PYTHONHASHSEED="12345")
  out = subprocess.run([sys.executable, "-c", code, str(REPO)], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == _digest(sites)


def test_different_seed_different_corpus(sites):
  other = syn.synthetic_sites(seed=1)
  texts = {d.text for d in _all_docs(sites)}
  other_texts = {d.text for d in _all_docs(other)}
  assert len(texts & other_texts) < 0.1 * len(texts)


def test_documents_valid(sites):
  for d in _all_docs(sites):
    validate_document(d, syn.ENTITY_TYPES, syn.RELATION_TYPES)
    assert 0 < len(d.text) <= syn.MAX_CHARS
    ents = {e.id: e for e in d.entities}
    assert len(ents) == len(d.entities) and d.entities
    for e in d.entities:
      assert d.text[e.start:e.end] == e.text and e.text == e.text.strip() and not e.fragments
    spans = sorted((e.start, e.end) for e in d.entities)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlap in {d.id}"
    for r in d.relations:
      head, tail = ents[r.head], ents[r.tail]
      assert head.type in ANCHORS and tail.type == r.type and r.type in syn.MODIFIER_TYPES
    assert len({r.id for r in d.relations}) == len(d.relations)
    assert len({(r.head, r.tail) for r in d.relations}) == len(d.relations)


def test_no_text_repeats_across_splits_or_sites(sites):
  texts = [d.text for d in _all_docs(sites)]
  assert len(texts) == len(set(texts))
  for splits in sites.values():
    train = {d.text for d in splits["train"].documents}
    assert not train & {d.text for d in splits["test"].documents}
    assert not train & {d.text for d in splits["dev"].documents}


def test_sites_differ(sites):
  names = list(sites)
  ents = {n: sites[n]["train"].entity_counts() for n in names}
  rels = {n: sites[n]["train"].relation_counts() for n in names}
  vocab = {n: {e.text for c in sites[n].values() for d in c.documents for e in d.entities}
           for n in names}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert _tv(ents[a], ents[b], syn.NER_TYPES) > 0.15, (a, b)
      assert _tv(rels[a], rels[b], syn.RELATION_TYPES) > 0.15, (a, b)
      jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
      assert jaccard < 0.3, (a, b, jaccard)
  # The intended skews: the clinic is mostly drugs, the hospital mostly problems and tests.
  clinic, hospital = ents["telegraphic_clinic"], ents["narrative_hospital"]
  assert clinic["drug"] >= max(clinic[t] for t in syn.NER_TYPES)
  assert hospital["problem"] + hospital["test"] > 0.7 * sum(hospital[t] for t in syn.NER_TYPES)
  assert ents["discharge_summary"]["treatment"] > 2 * hospital["treatment"] * 60 / 200


def test_enough_variety(sites):
  docs = _all_docs(sites)
  forms = {(e.type, e.text) for d in docs for e in d.entities}
  by_type = collections.Counter(t for t, _ in forms)
  assert len(forms) > 500
  for t in syn.NER_TYPES:
    assert by_type[t] >= 40, (t, by_type[t])
  for t in syn.MODIFIER_TYPES:
    assert by_type[t] >= 5, (t, by_type[t])
  assert set(by_type) == set(syn.ENTITY_TYPES)
  assert {r.type for d in docs for r in d.relations} == set(syn.RELATION_TYPES)


def test_default_generation_is_fast():
  start = time.perf_counter()
  syn.synthetic_sites()
  assert time.perf_counter() - start < 1.0


def test_make_site_options():
  with pytest.raises(ValueError, match="unknown synthetic style"):
    syn.make_site("x", "poetry", 3, seed=0)
  with pytest.raises(ValueError, match="bad clause mix"):
    syn.make_site("x", "narrative", 3, seed=0, mix={"surgery": 1.0})
  drugs_only = syn.make_site("x", "narrative", 30, seed=0, mix={"drug": 1.0})
  assert {e.type for d in drugs_only.documents for e in d.entities} <= {
      "drug", "problem", "dosage", "route", "frequency", "duration", "temporal"}
  first = syn.make_site("x", "telegraphic", 10, seed=0, split="dev")
  assert first.split == "dev" and first.documents[0].id == "x-dev-0000"
  again = syn.make_site("x", "telegraphic", 10, seed=0, split="dev",
                        exclude={first.documents[0].text})
  assert first.documents[0].text not in {d.text for d in again.documents}


def test_more_sites_and_one_size_for_all():
  sites = syn.synthetic_sites(num_sites=4, docs_per_site=(5, 2, 3), seed=3)
  assert list(sites) == ["narrative_hospital", "telegraphic_clinic", "discharge_summary",
                         "narrative_hospital_2"]
  assert all([len(s[k].documents) for k in syn.SPLITS] == [5, 2, 3] for s in sites.values())
  a, b = sites["narrative_hospital"], sites["narrative_hospital_2"]
  assert a["train"].documents[0].text != b["train"].documents[0].text
  with pytest.raises(ValueError):
    syn.synthetic_sites(num_sites=0)
  with pytest.raises(ValueError):
    syn.synthetic_sites(docs_per_site=((1, 2),))
