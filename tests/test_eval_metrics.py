"""The paper's scoring protocol: hand-made cases with known answers, and agreement with seqeval."""

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB2

from fedjax_lora.data import tasks
from fedjax_lora.data.markup import Span, render, select_flat
from fedjax_lora.eval import metrics
from fedjax_lora.eval.metrics import (COLLAPSED, aggregate, align_tokens, bio_strict_scores,
                                      bio_to_spans, harmonic_mean, score, spans_to_bio, tokenize)

TEXT = "Pt has chest pain; no fever. Given 5 mg aspirin daily."
GOLD = [Span(7, 17, "Problem"), Span(22, 27, "Problem"), Span(35, 39, "Dose"),
        Span(40, 47, "Drug")]
LABELS = ("Problem", "Dose", "Drug")


def _span(text, phrase, label, nth=0):
  start = -1
  for _ in range(nth + 1):
    start = text.index(phrase, start + 1)
  return Span(start, start + len(phrase), label)


def _score1(html, text=TEXT, gold=GOLD, **kw):
  return score([(text, gold)], [html], **kw)


def test_tokenize_pads_punctuation_and_keeps_offsets():
  text = "BP 120/80,HR: 72; temp 37.5 C.\n  Done"
  toks = tokenize(text)
  padded = text
  for mark in ":;,.":
    padded = padded.replace(mark, f" {mark} ")
  assert [t.text for t in toks] == padded.split()
  assert all(text[t.start:t.end] == t.text for t in toks)
  assert tokenize("") == [] and tokenize("  \n") == []


def test_spans_to_bio_overlap_rule_and_shared_tokens():
  text = "aspirin-induced rash, mild"
  toks, tags = spans_to_bio(text, [_span(text, "aspirin", "Drug"), _span(text, "rash, mild", "AE")])
  assert [t.text for t in toks] == ["aspirin-induced", "rash", ",", "mild"]
  assert tags == ["B-Drug", "B-AE", "I-AE", "I-AE"]
  problems = __import__("collections").Counter()
  _, tags = spans_to_bio("mg/day x", [Span(0, 2, "A"), Span(3, 6, "B")], problems)
  assert tags == ["B-A", "O"]
  assert problems["gold span sharing a token with another (dropped)"] == 1


def test_exact_match_scores_one():
  r = _score1(render(TEXT, GOLD), labels=LABELS)
  seq = r["seqeval"]
  for block in (r["strict"], r["lenient"], seq["collapsed"], seq["typed"]["micro"]):
    assert block["precision"] == block["recall"] == block["f1"] == 1.0
  assert r["strict"]["tp"] == 4 and r["strict"]["fp"] == r["strict"]["fn"] == 0
  assert all(v["strict"]["f1"] == 1.0 for v in r["per_type"].values())
  assert r["problems"] == {} and r["n_gold_tokens"] == r["n_pred_tokens"] == 14


def test_one_boundary_off_is_strict_miss_lenient_hit():
  pred = [_span(TEXT, "pain", "Problem"), *GOLD[1:]]  # "chest pain" -> "pain"
  r = _score1(render(TEXT, pred))
  assert (r["strict"]["tp"], r["strict"]["fp"], r["strict"]["fn"]) == (3, 1, 1)
  assert r["strict"]["precision"] == r["strict"]["recall"] == 0.75
  assert r["lenient"]["tp"] == 4 and r["lenient"]["f1"] == 1.0
  assert r["per_type"]["Problem"]["strict"]["tp"] == 1
  assert r["per_type"]["Problem"]["lenient"]["tp"] == 2
  assert r["seqeval"]["collapsed"]["f1"] == pytest.approx(r["strict"]["f1"])


def test_wrong_type_counts_in_per_type_not_collapsed():
  pred = [Span(7, 17, "Drug"), *GOLD[1:]]  # "chest pain" tagged as a Drug
  r = _score1(render(TEXT, pred), labels=LABELS)
  assert r["strict"]["f1"] == r["lenient"]["f1"] == 1.0
  drug, prob = r["per_type"]["Drug"]["strict"], r["per_type"]["Problem"]["strict"]
  assert (drug["tp"], drug["fp"], drug["fn"]) == (1, 1, 0)
  assert (prob["tp"], prob["fp"], prob["fn"]) == (1, 0, 1)
  assert r["per_type"]["Drug"]["lenient"]["fp"] == 1
  typed = r["seqeval"]["typed"]
  assert typed["micro"]["precision"] == 0.75 and typed["per_type"]["Problem"]["recall"] == 0.5
  assert r["seqeval"]["collapsed"]["f1"] == 1.0


def test_invented_text_and_broken_tags_never_crash():
  html = ('Note: Pt has <span class="Problem">chest pain</span>; no <span class="Problem">fever'
          '</span></span>. Given <span class="Dose">5 mg</span> <span class="Foo">aspirin</span> '
          'daily. <span class="Drug">Tylenol PRN')
  r = _score1(html, labels=LABELS)
  p = r["problems"]
  assert p["unknown label"] == 1 and p["stray close tag"] == 1 and p["unclosed span"] == 1
  assert p["predicted tokens unaligned"] == 4  # "Note", ":", "Tylenol", "PRN"
  assert p["predicted span with no aligned token"] == 1  # the invented "Tylenol PRN"
  assert "gold tokens unaligned" not in p
  for kind in ("strict", "lenient"):
    assert (r[kind]["tp"], r[kind]["n_pred"], r[kind]["n_gold"]) == (3, 3, 4)
  assert r["per_type"]["Drug"]["strict"]["fn"] == 1


def test_empty_prediction_gives_zero_recall_without_error():
  for html in ("", "   ", None):
    r = _score1(html)
    assert r["strict"]["recall"] == r["lenient"]["recall"] == 0.0
    assert r["strict"]["precision"] == r["strict"]["f1"] == 0.0
    assert r["strict"]["fn"] == 4 and r["problems"]["empty prediction"] == 1
    assert r["problems"]["gold tokens unaligned"] == 14
    assert r["seqeval"]["collapsed"]["recall"] == 0.0
  r = score([("", []), ("x", [])], ["", "x"])
  assert r["strict"]["f1"] == 0.0 and r["seqeval"]["collapsed"]["f1"] == 0.0


def test_changed_punctuation_spacing_and_case_still_align():
  html = ('PT HAS <span class="Problem">Chest pain</span> ;no <span class="Problem">fever</span>.'
          'Given <span class="Dose">5 mg</span>   <span class="Drug">aspirin</span> daily .')
  r = _score1(html)
  assert r["strict"]["f1"] == 1.0
  assert r["problems"] == {}


def test_changed_word_inside_a_span_is_covered():
  text = "a b c d"
  r = score([(text, [Span(0, 7, "X")])], ['<span class="X">a zzz qqq d</span>'],
            return_aligned=True)
  al = r["aligned"][0]
  assert al.pred == [(0, 4, "X")]  # b, c unaligned in the middle; the span still spans a..d
  assert al.problems["gold tokens unaligned"] == 2 and r["strict"]["f1"] == 1.0


def test_alignment_greedy_confirmed_and_windowed():
  assert align_tokens("a b c".split(), "a b c".split()) == [0, 1, 2]
  # an invented "," does not jump to the far ","; a changed token is skipped on both sides
  assert align_tokens("a b , c x d".split(), "a b c d , e".split()) == [0, 1, None, 2, None, 3]
  # a dropped gold stretch is skipped within the window only
  gold = ["w%d" % i for i in range(10)] + ["tail", "end"]
  assert align_tokens(["w0", "tail", "end"], gold) == [0, 10, 11]
  assert align_tokens(["w0", "tail", "end"], gold, window=5) == [0, None, None]
  assert align_tokens([], gold) == [] and align_tokens(["a"], []) == [None]
  assert metrics.jaccard_match("teh", "THE") and not metrics.jaccard_match("fever", "fevers")


def test_lenient_is_one_to_one():
  text = "left arm and right leg"
  gold = [Span(0, 8, "Loc"), Span(13, 22, "Loc")]
  r = score([(text, gold)], ['<span class="Loc">left arm and right leg</span>'])
  assert r["strict"]["tp"] == 0
  assert (r["lenient"]["tp"], r["lenient"]["precision"], r["lenient"]["recall"]) == (1, 1.0, 0.5)
  # Two predictions overlapping one gold entity: one matches, the other is a false positive.
  r = score([(text, [Span(0, 22, "Loc")])],
            ['<span class="Loc">left arm</span> and <span class="Loc">right leg</span>'])
  assert (r["lenient"]["tp"], r["lenient"]["precision"], r["lenient"]["recall"]) == (1, 0.5, 1.0)


def test_relation_task_skips_anchors_by_label_and_by_position():
  text = "Aspirin 81 mg daily for pain"
  anchor = _span(text, "Aspirin", "Drug")
  gold = (_span(text, "81 mg", "Strength"), _span(text, "daily", "Frequency"))
  ex = tasks.Example("s", "re", "d", "prompt", render(text, [anchor, *gold]), text, gold,
                     (anchor,))
  r = score([ex], [ex.target], labels=("Strength", "Frequency"), ignore_labels=("Drug",))
  assert r["strict"]["f1"] == 1.0 and r["skipped"] == {"ignored-label span": 1}
  assert r["problems"] == {}
  # Anchor class shared with a relation class: the anchor's own position is skipped.
  same = render(text, [Span(anchor.start, anchor.end, "Strength"), *gold])
  r = score([ex], [same])
  assert r["strict"]["f1"] == 1.0 and r["skipped"] == {"anchor span": 1}
  r = score([ex], [same], use_anchors=False)
  assert r["strict"]["fp"] == 1


def test_evaluator_scores_with_the_examples_labels_not_the_prompt_text():
  from fedjax_lora.eval import evaluator
  # The prompts name no label at all: the classes come from the Example's label lists.
  ner = tasks.Example("s", "ner", "d0", "Tag the text.", render(TEXT, GOLD), TEXT,
                      tuple(GOLD), entity_labels=LABELS)
  sets = evaluator.eval_sets("s", [ner])
  assert sets["ner"].labels == set(LABELS) and not sets["ner"].ignore
  assert evaluator.score_set(sets["ner"], [ner.target])["strict"]["f1"] == 1.0
  foreign = evaluator.score_set(sets["ner"], [ner.target.replace('"Drug"', '"Gene"')])
  assert foreign["problems"]["unknown label"] == 1 and foreign["strict"]["fp"] == 0
  text = "Aspirin 81 mg daily for pain"
  anchor = _span(text, "Aspirin", "Drug")
  gold = (_span(text, "81 mg", "Strength"), _span(text, "daily", "Frequency"))
  re_ex = tasks.Example("s", "re", "d1", "Mark the related spans.",
                        render(text, [anchor, *gold]), text, gold, (anchor,),
                        entity_labels=("Drug", "Reason"),
                        relation_labels=("Strength", "Frequency", "Route"))
  re_set = evaluator.eval_sets("s", [re_ex])["re"]
  assert re_set.labels == {"Strength", "Frequency", "Route"}
  assert re_set.ignore == {"Drug", "Reason"}
  r = evaluator.score_set(re_set, [re_ex.target])
  assert r["strict"]["f1"] == 1.0 and r["skipped"] == {"ignored-label span": 1}
  with pytest.raises(ValueError, match="relation labels"):
    evaluator.prompt_labels(tasks.Example("s", "re", "d2", "Mark.", text, text, gold))


def test_bio_to_spans_reads_iob2_like_seqeval_strict():
  assert bio_to_spans(["B-A", "I-A", "I-B", "B-A", "O", "I-A", "B-B"]) == [
      (0, 2, "A"), (3, 4, "A"), (6, 7, "B")]


def _random_tags(rng, n, types=("A", "B", "C-x")):
  return [rng.choice(["O", "O", "O", *(f"{p}-{t}" for p in "BI" for t in types)]) for _ in range(n)]


def test_entity_strict_scores_equal_seqeval_on_random_sequences():
  rng = random.Random(1234)
  for trial in range(200):
    n_sent = rng.randint(1, 4)
    lengths = [rng.randint(0 if trial % 7 else 1, 12) for _ in range(n_sent)]
    y_true = [_random_tags(rng, n) for n in lengths]
    y_pred = [[t if rng.random() < 0.6 else rng.choice(_random_tags(rng, 1)) for t in seq]
              for seq in y_true]
    ours = bio_strict_scores(y_true, y_pred)
    if not any(ours["per_type"]):
      continue
    kw = dict(mode="strict", scheme=IOB2, zero_division=0)
    assert ours["micro"]["f1"] == pytest.approx(f1_score(y_true, y_pred, **kw))
    assert ours["micro"]["precision"] == pytest.approx(precision_score(y_true, y_pred, **kw))
    assert ours["micro"]["recall"] == pytest.approx(recall_score(y_true, y_pred, **kw))
    rep = classification_report(y_true, y_pred, output_dict=True, **kw)
    assert set(ours["per_type"]) == set(rep) - {"micro avg", "macro avg", "weighted avg"}
    for t, v in ours["per_type"].items():
      assert v["n_gold"] == rep[t]["support"]
      assert (v["precision"], v["recall"], v["f1"]) == pytest.approx(
          (rep[t]["precision"], rep[t]["recall"], rep[t]["f1-score"]))


def test_score_strict_equals_its_seqeval_block_on_random_outputs():
  rng = random.Random(7)
  words = "the pt had chest pain , fever . no rash ; given 5 mg : aspirin".split()
  golds, preds = [], []
  for _ in range(40):
    toks = [rng.choice(words) for _ in range(rng.randint(0, 15))]
    text = " ".join(toks)
    offs, pos = [], 0
    for t in toks:
      offs.append((pos, pos + len(t)))
      pos += len(t) + 1
    def rand_spans():
      out, i = [], 0
      while i < len(toks):
        if rng.random() < 0.3:
          j = min(len(toks), i + rng.randint(1, 3))
          out.append(Span(offs[i][0], offs[j - 1][1], rng.choice(LABELS)))
          i = j
        i += 1
      return out
    gold = rand_spans()
    golds.append((text, gold))
    kept = [g for g in gold if rng.random() < 0.6]  # overlap with gold, plus random spans
    html = render(text, select_flat([*kept, *(x for x in rand_spans() if rng.random() < 0.3)])[0])
    corrupt = rng.choice([lambda h: h, lambda h: "xyz ; " + h, lambda h: h + " </span> qq",
                          lambda h: h + '<span class="Drug">',
                          lambda h: h.replace("</span>", "", 1),
                          lambda h: h.replace(" ", rng.choice(["  ", " , ", " qq "]), 2)])
    html = corrupt(html)
    preds.append(html)
  r = score(golds, preds)
  assert r["seqeval"]["collapsed"]["f1"] == pytest.approx(r["strict"]["f1"])
  assert r["seqeval"]["collapsed"]["precision"] == pytest.approx(r["strict"]["precision"])
  assert r["seqeval"]["collapsed"]["support"] == r["strict"]["n_gold"]
  tp = sum(v["strict"]["tp"] for v in r["per_type"].values())
  n_pred = sum(v["strict"]["n_pred"] for v in r["per_type"].values())
  assert r["seqeval"]["typed"]["micro"]["precision"] == pytest.approx(tp / n_pred)
  for t, v in r["seqeval"]["typed"]["per_type"].items():
    assert v["f1"] == pytest.approx(r["per_type"][t]["strict"]["f1"])
  assert r["lenient"]["tp"] >= r["strict"]["tp"] and COLLAPSED not in r["per_type"]


def test_aggregate_micro_macro_worst_and_hmean():
  site_a = score([(TEXT, GOLD)], [render(TEXT, GOLD)])  # F1 1
  site_b = score([(TEXT, GOLD)], [render(TEXT, GOLD[:2])])  # strict P 1, R .5
  agg = aggregate({"b": site_b, "a": site_a})
  assert agg["sites"] == ["a", "b"]
  micro = agg["micro"]["strict"]
  assert (micro["tp"], micro["n_pred"], micro["n_gold"]) == (6, 6, 8)
  assert micro["recall"] == 0.75
  f1_b = 2 * 0.5 / 1.5
  assert agg["macro"]["strict"]["f1"] == pytest.approx((1 + f1_b) / 2)
  assert agg["macro"]["seqeval"]["f1"] == pytest.approx((1 + f1_b) / 2)
  assert agg["worst_site"]["lenient"] == {"site": "b", "value": pytest.approx(f1_b)}
  assert agg["hmean_f1"]["strict"] == pytest.approx(2 / (1 + 1 / f1_b))
  assert agg["micro"]["per_type"]["Drug"]["strict"]["n_gold"] == 2
  assert harmonic_mean([0.5, 0.0]) == 0.0
  with pytest.raises(ValueError):
    aggregate({})


def test_score_rejects_mismatched_lengths():
  with pytest.raises(ValueError):
    score([(TEXT, GOLD)], [])
