"""HTML markup round trips, tolerant parsing, windows that keep mentions whole, and prompts."""

import pytest

from fedjax_lora.data import markup, tasks, windows
from fedjax_lora.data.markup import Span
from fedjax_lora.data.records import Document, Entity, Relation, validate_document


def test_render_parse_round_trip_keeps_literal_angle_brackets():
  text = "Give <5 mg of aspirin if BP > 140 and x<y."
  spans = [Span(14, 21, "Drug"), Span(25, 27, "Test")]
  html = markup.render(text, spans)
  assert html == ('Give <5 mg of <span class="Drug">aspirin</span> if <span class="Test">BP'
                  '</span> > 140 and x<y.')
  parsed = markup.parse(html)
  assert parsed.text == text and parsed.spans == spans and not parsed.problems


@pytest.mark.parametrize("html,spans,problem", [
    ('a <span class="X">b', [Span(2, 3, "X")], "unclosed span"),
    ('a </span>b', [], "stray close tag"),
    ('<span class="X">a <span class="Y">b</span></span>', [Span(0, 2, "X"), Span(2, 3, "Y")],
     "nested span"),
    ('<span class="Z">a</span> b', [], "unknown label"),
    ('<span class="X"></span>b', [], "empty span"),
    ("<span class=X>a</span>", [Span(0, 1, "X")], None),
    ("<span class='X' >a</span >", [Span(0, 1, "X")], None),
])
def test_parser_repairs_broken_markup_and_counts_it(html, spans, problem):
  parsed = markup.parse(html, labels={"X", "Y"})
  assert parsed.spans == spans
  if problem:
    assert parsed.problems[problem] == 1
  else:
    assert not parsed.problems


def test_select_flat_drops_overlaps_and_reports_them():
  kept, dropped = markup.select_flat([Span(0, 10, "A"), Span(2, 5, "B"), Span(10, 12, "C"),
                                      Span(0, 10, "A")])
  assert kept == [Span(0, 10, "A"), Span(10, 12, "C")] and dropped == [Span(2, 5, "B")]


def _doc():
  text = ("Aspirin was stopped. Warfarin caused severe bleeding in the gut.\n"
          "Follow-up in 2 weeks.")
  ents = (Entity("T1", 0, 7, "Drug", "Aspirin"), Entity("T2", 21, 29, "Drug", "Warfarin"),
          Entity("T3", 37, 52, "AE", "severe bleeding"), Entity("T4", 60, 63, "Loc", "gut"),
          Entity("T5", 78, 85, "Time", "2 weeks"))
  rels = (Relation("T2", "T3", "causes", "R1"), Relation("T3", "T4", "at", "R2"),
          Relation("T1", "T5", "when", "R3"))
  doc = Document("d1", text, ents, rels, "mem", 1)
  validate_document(doc)
  return doc


def test_sentence_windows_keep_mentions_and_count_lost_relations():
  doc = _doc()
  report = windows.WindowReport()
  wins = windows.split_document(doc, max_tokens=None, unit="sentence", pack=False,
                                report=report)
  assert [w.text for w in wins] == ["Aspirin was stopped.",
                                    "Warfarin caused severe bleeding in the gut.",
                                    "Follow-up in 2 weeks."]
  for w in wins:
    validate_document(w)
  assert [len(w.relations) for w in wins] == [0, 2, 0]
  assert report.relations_across_windows == 1 and report.concept_relations_lost == 1
  assert sum(len(w.entities) for w in wins) == len(doc.entities)


def test_windows_never_cut_inside_a_mention():
  text = "Pain in the left arm. Relief after rest."
  ent = Entity("T1", 8, 24, "Finding", "the left arm. Re")  # straddles the sentence end
  doc = Document("d", text, (ent,))
  validate_document(doc)
  wins = windows.split_document(doc, max_tokens=None, unit="sentence", pack=False)
  assert len(wins) == 1 and wins[0].entities[0].text == "the left arm. Re"


def test_packing_respects_the_budget():
  text = " ".join(f"Sentence number {i} is here." for i in range(40))
  doc = Document("long", text)
  wins = windows.split_document(doc, max_tokens=30, unit="sentence")
  assert len(wins) > 1
  assert all(windows.approx_token_count([w.text])[0] <= 30 for w in wins)
  assert " ".join(w.text for w in wins) == text


def test_oversized_sentence_is_cut_at_spaces_outside_mentions():
  words = ["word"] * 60
  text = " ".join(words)
  doc = Document("x", text, (Entity("T1", 100, 114, "X", text[100:114]),))
  report = windows.WindowReport()
  wins = windows.split_document(doc, max_tokens=10, unit="sentence", report=report)
  assert report.oversized_units_cut == 1 and len(wins) > 3
  assert sum(len(w.entities) for w in wins) == 1


def test_ner_prompt_lists_only_the_sources_labels_and_round_trips():
  doc = _doc()
  spec = tasks.LabelSpec(entity_map={"AE": "AdverseEffect", "Loc": None},
                         entity_glosses={"Drug": "a drug"})
  labels = tasks.source_labels([doc], spec)
  assert labels == (["AdverseEffect", "Drug", "Time"], ["at", "causes", "when"])
  report = tasks.TaskReport()
  (ex,) = tasks.build_examples("src", [doc], ["ner"], spec, labels, report)
  assert 'Use <span class="Drug"> to denote a drug.' in ex.prompt
  assert "Loc" not in ex.prompt and report.counts["mention of unmapped type Loc"] == 1
  assert ex.prompt.endswith(doc.text + "\n### Output Text:\n")
  parsed = markup.parse(ex.target)
  assert parsed.text == doc.text and tuple(parsed.spans) == ex.spans
  # The example carries the label list its prompt offers.
  assert ex.entity_labels == ("AdverseEffect", "Drug", "Time") and ex.relation_labels == ()
  assert all(f'<span class="{t}">' in ex.prompt for t in ex.entity_labels)


def test_re_examples_mark_anchor_in_input_and_related_in_output():
  doc = _doc()
  spec = tasks.LabelSpec()
  labels = tasks.source_labels([doc], spec)
  report = tasks.TaskReport()
  exs = tasks.build_examples("src", [doc], ["re"], spec, labels, report)
  by_anchor = {e.anchors[0].label + ":" + doc.text[e.anchors[0].start:e.anchors[0].end]: e
               for e in exs}
  ex = by_anchor["Drug:Warfarin"]
  assert '<span class="Drug">Warfarin</span>' in ex.prompt
  assert "### Modifier Entity Markup Guide:" in ex.prompt
  assert ex.prompt.endswith("\n\n### Output Text:\n")
  assert ex.spans == (Span(37, 52, "causes"),)
  parsed = markup.parse(ex.target)
  assert parsed.text == doc.text
  assert sorted(parsed.spans) == sorted(ex.spans + ex.anchors)
  assert (list(ex.entity_labels), list(ex.relation_labels)) == labels
  guides = ex.prompt.split("### Modifier Entity Markup Guide:\n")[1].split("\n\n")[0]
  assert [line.split('"')[1] for line in guides.splitlines()] == list(ex.relation_labels)


def test_undirected_relations_yield_both_directions():
  doc = _doc()
  spec = tasks.LabelSpec(undirected=("causes",))
  exs = tasks.build_examples("s", [doc], ["re"], spec, tasks.source_labels([doc], spec),
                             tasks.TaskReport())
  anchors = {doc.text[e.anchors[0].start:e.anchors[0].end] for e in exs}
  assert {"Warfarin", "severe bleeding"} <= anchors


def test_discontinuous_mentions_follow_the_policy():
  text = "left and right arm"
  ent = Entity("T1", 0, 4, "Loc", "left arm", fragments=((0, 4), (15, 18)))
  doc = Document("d", text, (ent,))
  validate_document(doc)
  spec = tasks.LabelSpec()
  labels = tasks.source_labels([doc], spec)
  report = tasks.TaskReport()
  (ex,) = tasks.build_examples("s", [doc], ["ner"], spec, labels, report)
  assert ex.spans == (Span(0, 4, "Loc"),)
  assert report.counts["discontinuous mention: first fragment kept"] == 1
  report = tasks.TaskReport()
  (ex,) = tasks.build_examples("s", [doc], ["ner"], spec, labels, report, discontinuous="drop")
  assert ex.spans == () and report.counts["discontinuous mention dropped"] == 1


def test_empty_fraction_samples_windows_without_mentions_deterministically():
  docs = [Document(f"e{i}", f"No drugs here {i}.") for i in range(200)]
  spec = tasks.LabelSpec()
  runs = [tasks.build_examples("s", docs, ["ner"], spec, (["Drug"], []), tasks.TaskReport(),
                               empty_fraction=0.25, seed=3) for _ in range(2)]
  assert [e.doc_id for e in runs[0]] == [e.doc_id for e in runs[1]]
  assert 25 <= len(runs[0]) <= 75


def test_reader_sentence_bounds_are_preferred():
  text = "Dr. Smith saw pt. today. Fine."
  doc = Document("s", text, meta={"sentences": ((0, 24), (25, 30))})
  wins = windows.split_document(doc, None, "sentence", pack=False)
  assert [w.text for w in wins] == ["Dr. Smith saw pt. today.", "Fine."]


def test_concept_grouping_anchors_every_mention_of_the_head_concept():
  text = "BRCA1 and BRCA1/2 variants raise cancer risk."
  ents = (Entity("T1", 0, 5, "Gene", "BRCA1", concept="672"),
          Entity("T2", 10, 17, "Gene", "BRCA1/2", concept="672,675"),
          Entity("T3", 32, 38, "Disease", "cancer", concept="D1"))
  rels = (Relation("T1", "T3", "Association", "R1"), Relation("T2", "T3", "Association", "R1"))
  doc = Document("d", text, ents, rels, meta={"relation_concepts": {"R1": ("672", "D1")}})
  spec = tasks.LabelSpec(group_by_concept=True)
  (ex,) = tasks.build_examples("s", [doc], ["re"], spec, tasks.source_labels([doc], spec),
                               tasks.TaskReport())
  assert [text[a.start:a.end] for a in ex.anchors] == ["BRCA1", "BRCA1/2"]
  assert ex.spans == (Span(32, 38, "Association"),)


def test_transitive_groups_relate_every_member():
  text = "diabetes or asthma or gout"
  ents = (Entity("A", 0, 8, "C", "diabetes"), Entity("B", 12, 18, "C", "asthma"),
          Entity("G", 22, 26, "C", "gout"))
  rels = (Relation("A", "B", "OR"), Relation("B", "G", "OR"))  # a chain, as brat * lines give
  doc = Document("d", text, ents, rels)
  spec = tasks.LabelSpec(transitive=("OR",))
  exs = tasks.build_examples("s", [doc], ["re"], spec, tasks.source_labels([doc], spec),
                             tasks.TaskReport())
  by_anchor = {text[e.anchors[0].start:e.anchors[0].end]:
               sorted(text[s.start:s.end] for s in e.spans) for e in exs}
  assert by_anchor == {"diabetes": ["asthma", "gout"], "asthma": ["diabetes", "gout"],
                       "gout": ["asthma", "diabetes"]}
