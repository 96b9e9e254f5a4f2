"""Generation-based evaluation: labels from the examples, batched decoding, the settings runner."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.evaluate as evaluate_config
from fedjax_lora import experiment
from fedjax_lora.data import prepare, sites as sites_lib
from fedjax_lora.data.arrays import pool, take_rows
from fedjax_lora.data.markup import Span
from fedjax_lora.eval import decoding, evaluator, plots
from fedjax_lora.eval.settings import SETTINGS, SettingsRun, check_eval_config
from fedjax_lora.errors import ConfigError
from models import llama
from models import lora as lora_lib
from models.config import LlamaConfig
from models.tokenizer import build_byte_tokenizer

QUIET = lambda s: None


@pytest.fixture(scope="module")
def synthetic_test_examples():
  config = evaluate_config.get_config().data
  plan = sites_lib.build_sites(config)
  return {n: s.examples["test"] for n, s in plan.sites.items()}


def test_gold_answers_score_one_with_the_prompts_labels(synthetic_test_examples):
  for site, examples in synthetic_test_examples.items():
    sets = evaluator.eval_sets(site, examples, max_per_task=12)
    assert set(sets) == {"ner", "re"}
    assert sets["ner"].labels == {"problem", "treatment", "test", "drug"}
    assert sets["re"].labels and not sets["re"].labels & {"problem", "treatment"}
    assert sets["re"].ignore >= {"problem"}
    for task, es in sets.items():
      assert len(es.examples) == 12 and es.available > 12
      result = evaluator.score_set(es, [e.target for e in es.examples])
      assert result["strict"]["f1"] == 1.0 and result["lenient"]["f1"] == 1.0, (site, task)
      assert result["strict"]["n_gold"] > 0
      assert "unknown label" not in result["problems"]
      assert result["seqeval"]["collapsed"]["f1"] == 1.0


def test_answers_with_foreign_classes_or_nothing_are_counted_not_crashed(
    synthetic_test_examples):
  es = evaluator.eval_sets("s", synthetic_test_examples["narrative_hospital"], 6)["ner"]
  foreign = [e.target.replace('class="problem"', 'class="Gene"') for e in es.examples]
  result = evaluator.score_set(es, foreign)
  n_problem = sum(1 for e in es.examples for s in e.spans if s.label == "problem")
  assert result["problems"]["unknown label"] == n_problem > 0
  assert result["strict"]["tp"] == result["strict"]["n_gold"] - n_problem
  empty = evaluator.score_set(es, [""] * len(es.examples))
  assert empty["strict"]["recall"] == 0.0 and empty["problems"]["empty prediction"] == 6


def test_re_prompt_labels_exclude_the_anchor_classes(synthetic_test_examples):
  ex = next(e for e in synthetic_test_examples["telegraphic_clinic"] if e.task == "re")
  scored, ignored = evaluator.prompt_labels(ex)
  assert {s.label for s in ex.spans} <= scored
  assert {a.label for a in ex.anchors} <= ignored and not scored & ignored


def test_spread_and_budget_and_clean_output():
  assert evaluator.spread(10, 0) == list(range(10))
  assert evaluator.spread(10, 3) == [0, 4, 9] or evaluator.spread(10, 3) == [0, 5, 9]
  assert evaluator.spread(3, 10) == [0, 1, 2]
  cfg = decoding.DecodeConfig(max_new_tokens=256, new_tokens_factor=2.0, new_tokens_margin=16)
  assert decoding.budget(10, cfg) == 36          # 2 x 10 + 16: each row its own budget
  assert decoding.budget(100, cfg) == 216
  assert decoding.budget(1000, cfg) == 256       # the cap
  # Full batches, then the rest at the next power of two (never more than batch_size).
  assert decoding.batch_sizes(16, 16) == [16]
  assert decoding.batch_sizes(4, 16) == [4]
  assert decoding.batch_sizes(37, 16) == [16, 16, 8]
  assert decoding.batch_sizes(3, 2) == [2, 1] and decoding.batch_sizes(0, 16) == []
  assert decoding.clean_output(' a <span class="x">b</span>\n### Input Text:\nmore') == \
      'a <span class="x">b</span>'
  with pytest.raises(ValueError, match="temperature"):
    decoding.DecodeConfig(temperature=-1)


@pytest.fixture(scope="module")
def sharp_byte_model(tmp_path_factory):
  tok = build_byte_tokenizer(tmp_path_factory.mktemp("tok"))
  config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0)
  graphdef, params = llama.init_model(config, seed=5)
  params = jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
  adapter = lora_lib.init_adapter(config, lora_lib.LoraSpec(rank=2, alpha=4), jax.random.key(1))
  return tok, config, graphdef, params, [adapter]


def test_batched_decoding_equals_one_at_a_time(sharp_byte_model):
  tok, config, graphdef, params, adapters = sharp_byte_model
  prompts = ["### Input Text:\nfever", "a much longer prompt about chest pain and more text",
             "x", "dose 5 mg", "shortness of breath since two days, on aspirin"]
  texts = ["fever", "chest pain", "x", "dose", "shortness"]
  cfg = decoding.DecodeConfig(batch_size=4, max_new_tokens=16, new_tokens_factor=1.0,
                              new_tokens_margin=4, min_new_tokens=4)
  batched = decoding.Decoder(config, graphdef, tok, cfg)
  outs, stats = batched.generate(params, adapters, prompts, texts)
  assert stats.prompts == 5 and stats.new_tokens > 0
  assert len({o for o in outs}) > 2, "outputs should differ between prompts"
  # Rows group by prompt bucket (three buckets here), each group one batch at the next
  # power of two of its rows: three shapes.
  assert stats.batches == len(stats.shapes) == 3
  assert all(size <= cfg.batch_size for size, *_ in stats.shapes)
  single = decoding.Decoder(config, graphdef, tok, dataclass_replace(cfg, batch_size=1))
  for p, t, o in zip(prompts, texts, outs):
    one, _ = single.generate(params, adapters, [p], [t])
    assert one == [o]
  assert batched.total.prompts == 5 and single.total.prompts == 5


def dataclass_replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)


def test_take_rows_and_pool_keep_rows_and_tokens():
  data = prepare.prepare(evaluate_config.get_config().data, None, log=QUIET)
  a, b = data.arrays["narrative_hospital"]["train"], data.arrays["discharge_summary"]["train"]
  assert len(take_rows(a, 5)) == 5
  np.testing.assert_array_equal(take_rows(a, 5).tokens, a.tokens[:5])
  pooled = pool([a, b])
  assert len(pooled) == len(a) + len(b)
  assert pooled.token_count == a.token_count + b.token_count
  assert set(data.sites) >= {"telegraphic_clinic_2", "discharge_summary_2"}
  assert data.sites["telegraphic_clinic_2"].role == "external"
  assert set(data.sites["telegraphic_clinic_2"].examples) == {"test"}
  assert data.sites["discharge_summary_2"].role == "new_site"


def tiny_eval_config(**eval_overrides):
  c = evaluate_config.get_config()
  for s in c.data.sites.values():
    s.max_train_examples = 8
  c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                 num_kv_heads=2)
  c.lora.update(rank=4, alpha=16.0)
  c.run.update(rounds=2, batch_size=4, val_examples_per_site=2, val_chunk=2)
  c.eval.update(algorithms=("fedavg",), adapt_k=(0, 8), max_examples_per_task=2,
                round_examples_per_task=1, max_new_tokens=32, batch_size=4)
  c.eval.update(**eval_overrides)
  return c


def test_bad_eval_configs_name_the_field():
  with pytest.raises(ConfigError, match="config.eval.settings"):
    check_eval_config(tiny_eval_config(settings=("zero_shot", "oracle")))
  with pytest.raises(ConfigError, match="config.eval.adapt_from"):
    check_eval_config(tiny_eval_config(adapt_from="fedyogi"))
  with pytest.raises(ConfigError, match="config.algorithm"):
    check_eval_config(tiny_eval_config(algorithms=("fedavg", "fedwhat")))
  with pytest.raises(ConfigError, match="adapt_k"):
    check_eval_config(tiny_eval_config(adapt_k=(-5,)))


def test_set_global_starts_from_the_given_adapter():
  c = tiny_eval_config()
  data = prepare.prepare(c.data, None, log=QUIET)
  fed = experiment.build(c, None, log=QUIET, data=data)
  start = jax.tree.map(lambda x: x + 0.5, fed.state["global"])
  fed.set_global(start)
  jax.tree.map(np.testing.assert_array_equal, fed.state["global"], start)
  with pytest.raises(ValueError, match="does not match"):
    fed.set_global({"q_proj": start["q_proj"]})


def test_end_to_end_report_has_every_setting(tmp_path):
  run = SettingsRun(tiny_eval_config(), tmp_path, log=QUIET)
  results = run.run()
  names = set(results["settings"])
  train = ["discharge_summary", "narrative_hospital", "telegraphic_clinic"]
  assert {"zero_shot", "single_site", "centralized", "federated/fedavg",
          "new_site/from_federated/k=0", "new_site/from_federated/k=8",
          "new_site/from_scratch/k=0", "new_site/from_scratch/k=8",
          *(f"single_site/{s}" for s in train)} == names
  assert set(results["seconds"]) == set(SETTINGS) - {"faulty", "val_size"}
  everywhere = set(train) | {"telegraphic_clinic_2", "discharge_summary_2"}
  for name in ("zero_shot", "centralized", "federated/fedavg"):
    assert set(results["settings"][name]["sites"]) == everywhere
  assert set(results["settings"]["single_site"]["sites"]) == set(train)
  fed = results["settings"]["federated/fedavg"]["sites"]["narrative_hospital"]["ner"]
  for key in ("strict", "lenient", "per_type", "seqeval", "problems", "samples", "generation"):
    assert key in fed
  assert fed["n_examples"] == 2
  # k = 0 is no training: the federated adapter as is, and the base model as is.
  s = results["settings"]
  assert (s["new_site/from_federated/k=0"]["sites"]["discharge_summary_2"]["ner"]["samples"] ==
          s["federated/fedavg"]["sites"]["discharge_summary_2"]["ner"]["samples"])
  assert (s["new_site/from_scratch/k=0"]["sites"]["discharge_summary_2"]["re"]["samples"] ==
          s["zero_shot"]["sites"]["discharge_summary_2"]["re"]["samples"])
  assert s["new_site/from_scratch/k=8"]["train_examples"] == 8
  # Report files: JSON round-trips, the table has one row per setting and both tasks.
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert set(on_disk["settings"]) == names
  md = (tmp_path / "results.md").read_text()
  assert "## NER" in md and "## RE" in md
  for name in names:
    # one row in the NER and RE tables, and one in the size table per trained/scored setting
    assert md.count(f"| {name} |") == (2 if name == "single_site" else 3)
  assert "narrative_hospital S" in md and "discharge_summary_2 L" in md
  history = results["runs"]["federated/fedavg"]["history"]
  assert len(history) == 2 and all(set(r["f1"]) == set(train) for r in history)
  for p in plots.PLOTS:
    assert (tmp_path / "runs" / "federated" / "fedavg" / "plots" / p).stat().st_size > 1000
  # Each setting records what it trained and how long it took.
  fed_row = results["settings"]["federated/fedavg"]
  assert fed_row["training"]["example_passes"] > 0 and fed_row["seconds"] > 0
  assert fed_row["training"]["supervised_tokens"] > 0
  assert results["generation"]["prompts"] > 0 and results["generation"]["tokens_per_second"] > 0
