"""The evidence run: paired bootstrap intervals, claim verdicts, resumable settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_lora import comm
from fedjax_lora.eval import bootstrap, claims
from fedjax_lora.eval.settings import SettingsRun, check_eval_config
from fedjax_lora.errors import ConfigError
from models.config import LlamaConfig
from models.lora import LoraSpec
from tests.test_eval_settings import QUIET, tiny_eval_config

ROOT = Path(__file__).resolve().parents[1]


def counts(tp, n_pred, n_gold):
  return np.stack([tp, n_pred, n_gold], axis=1)


def test_bootstrap_interval_brackets_a_known_difference():
  # 300 one-example documents with 2 gold entities each; A finds both in every example,
  # B only in the first 150: F1(A) = 1, F1(B) = 2*300/(300+600) = 2/3.
  n = 300
  a = counts(np.full(n, 2), np.full(n, 2), np.full(n, 2))
  b = counts(np.r_[np.full(150, 2), np.zeros(150)], np.r_[np.full(150, 2), np.zeros(150)],
             np.full(n, 2))
  rs = bootstrap.Resampler({"s": [f"d{i}" for i in range(n)]}, replicates=1000, seed=3)
  diff = rs.site_f1("s", a) - rs.site_f1("s", b)
  ci = bootstrap.interval(diff)
  assert ci["value"] == pytest.approx(1 - 2 / 3)
  assert ci["lo"] < 1 / 3 < ci["hi"]
  assert 0.25 < ci["lo"] and ci["hi"] < 0.42          # a tight interval, well above zero
  assert claims.verdict(ci["lo"], ci["hi"]) == claims.SUPPORTED
  # The same seed draws the same resamples; another seed others.
  again = bootstrap.Resampler({"s": [f"d{i}" for i in range(n)]}, replicates=1000, seed=3)
  np.testing.assert_array_equal(again.site_f1("s", b), rs.site_f1("s", b))
  other = bootstrap.Resampler({"s": [f"d{i}" for i in range(n)]}, replicates=1000, seed=4)
  assert not np.array_equal(other.site_f1("s", b), rs.site_f1("s", b))


def test_identical_predictions_give_a_zero_width_interval_and_no_verdict():
  rng = np.random.default_rng(0)
  tp = rng.integers(0, 3, 50)
  c = counts(tp, tp + rng.integers(0, 2, 50), tp + rng.integers(0, 2, 50))
  rs = bootstrap.Resampler({"s": [f"d{i}" for i in range(50)]}, replicates=500)
  ci = bootstrap.interval(rs.site_f1("s", c) - rs.site_f1("s", c))
  assert ci == {"value": 0.0, "lo": 0.0, "hi": 0.0}
  assert claims.verdict(ci["lo"], ci["hi"]) == claims.INCONCLUSIVE


def test_resampling_by_document_draws_a_documents_examples_together():
  # One document of four examples: every resample is that document, so F1 never moves.
  c = counts(np.array([1, 0, 2, 1]), np.array([1, 1, 2, 3]), np.array([2, 0, 2, 1]))
  one_doc = bootstrap.Resampler({"s": ["note"] * 4}, replicates=200)
  f1 = one_doc.site_f1("s", c)
  assert np.all(f1 == f1[0]) and f1[0] == pytest.approx(2 * 4 / (7 + 5))
  per_example = bootstrap.Resampler({"s": ["a", "b", "c", "d"]}, replicates=200)
  assert np.unique(per_example.site_f1("s", c)).size > 1
  with pytest.raises(ValueError, match="same test examples"):
    one_doc.site_f1("s", c[:3])


def test_verdicts_follow_where_the_interval_lies():
  assert claims.verdict(0.01, 0.2) == claims.SUPPORTED
  assert claims.verdict(-0.2, -0.01) == claims.CONTRADICTED
  assert claims.verdict(-0.1, 0.1) == claims.INCONCLUSIVE
  assert claims.verdict(0.0, 0.1) == claims.INCONCLUSIVE        # touching zero is not above
  # "comes close": within a 5-point margin.
  assert claims.verdict(-0.04, 0.01, margin=0.05) == claims.SUPPORTED
  assert claims.verdict(-0.2, -0.06, margin=0.05) == claims.CONTRADICTED
  assert claims.verdict(-0.08, -0.01, margin=0.05) == claims.INCONCLUSIVE
  # "differs": either side of zero.
  assert claims.verdict(-0.2, -0.01, two_sided=True) == claims.SUPPORTED
  assert claims.verdict(-0.2, 0.01, two_sided=True) == claims.INCONCLUSIVE


def _scores(f1_of_site: dict[str, float], n: int = 120) -> dict:
  """A made-up setting: per site, n one-entity examples, each with one predicted span, right
  in a fraction f of them (precision = recall = F1 = f)."""
  sites = {}
  for site, f in f1_of_site.items():
    hit = np.arange(n) < round(f * n)
    c = counts(hit.astype(int), np.ones(n, int), np.ones(n, int)).tolist()
    sites[site] = {"ner": {"per_example": {"strict": c, "lenient": c}}}
  return {"sites": sites}


def verdict_of(rows, claim: str, start: str) -> str:
  return next(r["verdict"] for r in rows
              if r["claim"] == claim and r["comparison"].startswith(start))


def test_claim_table_marks_made_up_scores():
  train, external, new = ["a", "b"], ["ext"], ["new"]
  everywhere = train + external + new
  settings = {
      "zero_shot": _scores({s: 0.1 for s in everywhere}),
      "federated/fedavg": _scores({"a": 0.6, "b": 0.6, "ext": 0.5, "new": 0.4}),
      "federated/fedmedlora_plus": _scores({"a": 0.6, "b": 0.6}),   # the same as FedAvg
      "single_site/a": _scores({"a": 0.9, "ext": 0.2, "new": 0.2}),  # better in-domain
      "single_site/b": _scores({"b": 0.9, "ext": 0.2, "new": 0.2}),
      "centralized": _scores({"a": 0.62, "b": 0.61}),
  }
  rs = bootstrap.Resampler({s: [f"{s}{i}" for i in range(120)] for s in everywhere},
                           replicates=500)
  rows = claims.evaluate(claims.paper_claims(train, external, new), settings, rs)
  verdict = lambda claim, start: verdict_of(rows, claim, start)
  assert verdict("1", "FedAvg − zero-shot") == claims.SUPPORTED
  assert verdict("2", "FedAvg − each site's own") == claims.CONTRADICTED
  assert verdict("2", "FedAvg − single-site models, held") == claims.SUPPORTED
  assert verdict("3", "Fed-MedLoRA+ − FedAvg, natural") == claims.INCONCLUSIVE
  assert verdict("3", "Fed-MedLoRA+ − FedAvg, one label") == claims.NOT_RUN
  assert verdict("4", "FedAvg − centralized") == claims.SUPPORTED   # within 5 points
  assert verdict("7", "Med-DualLoRA") == claims.NOT_RUN
  one = next(r for r in rows if r["claim"] == "1")
  assert one["strict"]["value"] == pytest.approx(50.0)              # F1 points


def test_claims_over_no_sites_are_not_run_rather_than_crashing():
  # One training site and no held-out or new site: nothing to average for claims 2b, 5, 6b.
  settings = {"zero_shot": _scores({"a": 0.1}), "federated/fedavg": _scores({"a": 0.5}),
              "single_site/a": _scores({"a": 0.4})}
  rs = bootstrap.Resampler({"a": [f"a{i}" for i in range(120)]}, replicates=100)
  rows = claims.evaluate(claims.paper_claims(["a"], [], [], adapt_k=["0", "10"]), settings, rs)
  assert verdict_of(rows, "1", "FedAvg − zero-shot") == claims.SUPPORTED
  assert {r["verdict"] for r in rows if r["claim"] == "5"} == {claims.NOT_RUN}
  assert verdict_of(rows, "2", "FedAvg − single-site models, held") == claims.NOT_RUN
  assert verdict_of(rows, "6", "each training site") == claims.NOT_RUN


def test_a_notes_sentences_share_one_resampling_group():
  from configs import data_synthetic
  from fedjax_lora.data import sites as sites_lib
  config = data_synthetic.get_config()
  for site in config.sites.values():
    site.unit, site.pack = "sentence", False
  examples = [e for s in sites_lib.build_sites(config).sites.values()
              for e in s.examples["test"]]
  windowed = [e for e in examples if "#" in e.doc_id.split("@")[0]]
  assert windowed, "sentence windows carry '#<i>' ids"
  for e in windowed:
    assert e.document == e.doc_id.split("@")[0].split("#")[0]
  groups = {e.document for e in examples}
  assert len(groups) < len({e.doc_id for e in examples})


def test_communication_arithmetic_matches_the_method_note():
  # method.md §8: r = 16 on all seven projections of Llama-3-8B is 41,943,040 parameters.
  cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_layers=32, num_heads=32, num_kv_heads=8)
  spec = LoraSpec(rank=16, alpha=32.0, targets="q,k,v,o,gate,up,down")
  t = comm.adapter_traffic(cfg, spec, 2)
  assert t["adapter_params"] == 41_943_040 and t["adapter_bytes"] == 83_886_080
  assert t["full_params"] == cfg.num_params() and 0.994 < t["reduction"] < 0.995


def test_evidence_config_validates_and_names_bad_fields():
  import configs.evidence as evidence
  c = evidence.get_config()
  check_eval_config(c)
  assert set(c.eval.settings) >= {"zero_shot", "federated", "faulty", "val_size",
                                  "single_site", "centralized", "new_site"}
  assert c.model.path == "smollm2-135m-instruct"
  c.eval.single_site_scope = "some"
  with pytest.raises(ConfigError, match="single_site_scope"):
    check_eval_config(c)
  c = evidence.get_config()
  c.eval.fault_sites = "nowhere:label_flip"
  with pytest.raises(ConfigError, match="nowhere"):
    check_eval_config(c)
  c = evidence.get_config()
  c.data.sites.ncbi_disease.role = "new_site"
  with pytest.raises(ConfigError, match="adapts one held-out site"):
    check_eval_config(c)


def _resume_config(**overrides):
  c = tiny_eval_config(settings=("zero_shot", "federated", "faulty", "new_site"),
                       fault_sites="telegraphic_clinic:label_flip",
                       fault_algorithms=("fedavg",), adapt_k=(0, 4), **overrides)
  c.security.ledger = False
  return c


def _scores_of(results: dict) -> dict:
  return {name: {site: {task: (r["strict"], r["lenient"], r["per_example"])
                        for task, r in by.items()}
                 for site, by in res["sites"].items()}
          for name, res in results["settings"].items()}


def test_a_killed_run_resumes_skipping_finished_settings_with_identical_numbers(tmp_path):
  fresh = SettingsRun(_resume_config(), tmp_path / "fresh", log=QUIET).run()
  # The same run in a process killed (SIGKILL) once its first setting is on disk ...
  workdir = tmp_path / "killed"
  script = ("import sys; from tests.test_evidence import _resume_config; "
            "from fedjax_lora.eval.settings import SettingsRun; "
            "SettingsRun(_resume_config(), sys.argv[1], log=print).run()")
  proc = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  results_file, deadline = workdir / "results.json", time.time() + 600
  try:
    while time.time() < deadline and proc.poll() is None:
      if results_file.is_file() and json.loads(results_file.read_text())["settings"]:
        break
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = json.loads(results_file.read_text())["settings"]
  assert list(done) == ["zero_shot"], "the run was not cut after its first setting"
  # ... then rerun in the same workdir: it skips what is done and finishes the rest.
  lines = []
  resumed = SettingsRun(_resume_config(), workdir, log=lines.append).run()
  assert "== zero_shot: done in an earlier run; skipped" in lines
  assert any(line.startswith("== federated/fedavg: fedavg") for line in lines)
  assert set(resumed["settings"]) == set(fresh["settings"])
  assert _scores_of(resumed) == _scores_of(fresh)
  assert resumed["claims"] == fresh["claims"]
  # A third run trains nothing, and a different config is refused, naming the field.
  lines.clear()
  SettingsRun(_resume_config(), workdir, log=lines.append).run()
  assert not any(line.startswith("round ") or "fine-tunes" in line for line in lines)
  assert all("skipped" in line for line in lines if line.startswith("== "))
  with pytest.raises(ConfigError, match=r"another config \(fields \['run'\]"):
    c = _resume_config()
    c.run.rounds = 3
    SettingsRun(c, workdir, log=QUIET)
  # Fields that only summarise (the bootstrap) may change: the claims are recomputed.
  c = _resume_config(bootstrap_replicates=300, bootstrap_seed=1)
  again = SettingsRun(c, workdir, log=QUIET).run()
  assert _scores_of(again) == _scores_of(fresh)
  assert again["config"]["eval"]["bootstrap_replicates"] == 300
  # The killed process, its resumption and the two reruns are the run's four parts.
  assert len(again["parts"]) == 4 and again["compile"]["parts"] == 4
  # --report_only trains nothing and adds no part.
  report = subprocess.run([sys.executable, "-m", "launch.evaluate", "--report_only",
                           "--config=configs/evaluate.py", f"--workdir={tmp_path / 'none'}"],
                          cwd=ROOT, capture_output=True, text=True)
  assert report.returncode != 0 and "no results.json" in report.stderr
  only = SettingsRun(_resume_config(), workdir, log=QUIET, report_only=True).report()
  assert len(only["parts"]) == 4 and _scores_of(only) == _scores_of(fresh)
  for plot in ("f1_by_setting.png", "f1_per_round.png", "new_site_k.png"):
    assert os.path.getsize(workdir / "plots" / plot) > 1000, plot
