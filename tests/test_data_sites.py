"""Site building end to end on the synthetic default (no ../shared), partitions, the launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import configs.data_synthetic as synthetic_config
from fedjax_lora.data import markup, prepare, sites as sites_lib
from fedjax_lora.data.records import DataError

REPO = Path(__file__).resolve().parent.parent


def _config(**partition):
  c = synthetic_config.get_config()
  c.tokenizer = "byte"
  c.max_length = 2048  # the byte tokenizer spends a token per character
  if partition:
    c.partition.update(partition)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  return out, prepare.prepare(_config(), out, log=lambda s: None)


def test_synthetic_default_builds_every_site_and_split(prepared):
  out, data = prepared
  assert sorted(data.sites) == sorted(synthetic_config.SITES)
  for name, site in data.sites.items():
    assert set(site.examples) == {"train", "dev", "test"}
    tasks = {e.task for e in site.examples["train"]}
    assert tasks == {"ner", "re"}, "multi-task sites mix NER and RE examples"
    arrays = data.arrays[name]["train"]
    assert len(arrays) == len(site.examples["train"])
    assert arrays.token_count == int(arrays.attention_mask.sum() - len(arrays))
    assert data.report["sites"][name]["splits"]["train"]["tokens"] == arrays.token_count
  report = json.loads((out / "report.json").read_text())
  assert report == json.loads(json.dumps(data.report))
  splits = json.loads((out / "splits.json").read_text())
  for name, by_split in splits.items():
    assert not set(by_split["train"]) & set(by_split["test"])


def test_every_target_parses_back_to_its_gold_spans(prepared):
  _, data = prepared
  for site in data.sites.values():
    for examples in site.examples.values():
      for ex in examples:
        parsed = markup.parse(ex.target)
        assert parsed.text == ex.text and not parsed.problems
        assert sorted(parsed.spans) == sorted(ex.spans + ex.anchors)


def test_prompts_list_only_the_sites_labels(prepared):
  _, data = prepared
  ex = next(e for e in data.sites["narrative_hospital"].examples["train"] if e.task == "ner")
  assert '<span class="problem">' in ex.prompt and "### Entity Definitions:" in ex.prompt
  defs = ex.prompt.split("### Entity Definitions:\n")[1].split("\n\n")[0].splitlines()
  assert [d.split(":")[0] for d in defs] == ["Medical Problem", "Treatment", "Drug", "Test"]
  assert '<span class="dosage">' not in ex.prompt  # modifiers are RE-only, as in the paper


def test_site_building_is_deterministic(prepared):
  _, data = prepared
  again = prepare.prepare(_config(), None, log=lambda s: None)
  for name in data.sites:
    assert [e.target for e in again.sites[name].examples["train"]] == \
        [e.target for e in data.sites[name].examples["train"]]
    np.testing.assert_array_equal(again.arrays[name]["train"].tokens,
                                  data.arrays[name]["train"].tokens)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_pooled_partitions_are_disjoint_and_covering(kind):
  natural = sites_lib.build_sites(_config()).sites
  plan = sites_lib.build_sites(_config(kind=kind, num_sites=4, alpha=0.5))
  pooled = plan.sites
  assert sorted(plan.sources) == sorted(natural)
  assert sorted(pooled) == ["site0", "site1", "site2", "site3"]
  for split in ("train", "dev", "test"):
    want = sorted(d for s in natural.values() for d in s.documents[split])
    got = [d for s in pooled.values() for d in s.documents[split]]
    assert sorted(got) == want and len(set(got)) == len(got)
  again = sites_lib.build_sites(_config(kind=kind, num_sites=4, alpha=0.5)).sites
  assert {n: s.documents for n, s in again.items()} == {n: s.documents for n, s in pooled.items()}


def _training_sites(plan_sites):
  return [n for n, s in plan_sites.items() if s.role == "train"]


def test_site_names_come_from_the_config_as_the_prepared_data_names_them(prepared):
  _, data = prepared
  assert sites_lib.training_site_names(_config()) == _training_sites(data.sites)
  # Held-out sites (external, new_site) are named in the config but never train.
  import configs.evaluate as evaluate_config
  held_out = evaluate_config.get_config().data
  names = sites_lib.training_site_names(held_out)
  assert names == _training_sites(sites_lib.build_sites(held_out).sites)
  assert len(names) == 3 and "telegraphic_clinic_2" not in names
  pooled = _config(kind="iid", num_sites=3)
  assert sites_lib.training_site_names(pooled) == \
      _training_sites(sites_lib.build_sites(pooled).sites) == ["site0", "site1", "site2"]


def test_train_cap_is_counted():
  c = _config()
  c.sites.narrative_hospital.max_train_examples = 50
  site = sites_lib.build_sites(c).sites["narrative_hospital"]
  assert len(site.examples["train"]) == 50
  assert site.skipped["train: examples over max_train_examples=50"] > 0


@pytest.mark.parametrize("field,value,needle", [
    ("corpus", "nope", "unknown corpus 'nope'"),
    ("tasks", ("ner", "qa"), "unknown task 'qa'"),
    ("unit", "paragraph", "unit must be one of"),
    ("train_split", "validation", "has splits"),
])
def test_bad_site_config_is_a_clear_error(field, value, needle):
  c = _config()
  c.sites.discharge_summary[field] = value
  with pytest.raises(DataError, match=needle):
    sites_lib.build_sites(c)


def _run(*args, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "launch.prepare_data", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_launcher_runs_without_shared_and_prints_the_table(tmp_path):
  proc = _run(f"--out_dir={tmp_path}", "--config.sites.narrative_hospital.max_train_examples=40",
              env_extra={"FEDJAX_LORA_SHARED": str(tmp_path / "no_shared_here")})
  assert proc.returncode == 0, proc.stderr
  assert "| narrative_hospital | train | train |" in proc.stdout
  for name in ("report.json", "report.md", "splits.json", "tokenizer/tokenizer.json"):
    assert (tmp_path / name).is_file()
  report = json.loads((tmp_path / "report.json").read_text())
  train = report["sites"]["narrative_hospital"]["splits"]["train"]
  assert sum(train["examples"].values()) == 40 and train["tokens"] > 0


def test_launcher_bad_input_is_one_line(tmp_path):
  proc = _run("--config.sites.narrative_hospital.corpus=phee",
              env_extra={"FEDJAX_LORA_SHARED": str(tmp_path / "missing")})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: corpus 'phee': folder")
  assert "Traceback" not in proc.stderr


def test_cross_corpus_twins_leave_dev_test_and_external_leaves_train(tmp_path):
  import datasets
  shared = "Warfarin increased the bleeding risk in elderly patients markedly."
  def save(name, splits):
    datasets.DatasetDict({s: datasets.Dataset.from_list([
        {"id": f"{name}-{s}-{i}", "text": t, "entities": [], "relations": []}
        for i, t in enumerate(texts)]) for s, texts in splits.items()}).save_to_disk(
            str(tmp_path / name))
  own = [f"Unique sentence number {i} that is long enough to be compared." for i in range(3)]
  save("a", {"train": [shared] + own, "dev": [shared] + own, "test": [shared] + own})
  save("ext", {"test": [shared, "Another external sentence that is long enough to count."]})
  c = _config()
  c.sites = {"a": dict(corpus=f"hf:{tmp_path / 'a'}", tasks=("ner",), unit="document"),
             "ext": dict(corpus=f"hf:{tmp_path / 'ext'}", tasks=("ner",), unit="document",
                         role="external", train_split=None, dev_split=None)}
  plan = sites_lib.build_sites(c)
  a = plan.sites["a"]
  assert len(a.documents["train"]) == 3 and len(a.documents["dev"]) == 3
  assert len(a.documents["test"]) == 3
  assert a.skipped[f"train: document also in hf:{tmp_path / 'ext'} (shared)"] == 1
  assert len(plan.sites["ext"].documents["test"]) == 1


def _brat(folder, name, text):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{name}.txt").write_text(text)
  (folder / f"{name}.ann").write_text(
      f"T1\tDrug 0 7\t{text[:7]}\nT2\tEffect 15 23\t{text[15:23]}\nR1\tcauses Arg1:T1 Arg2:T2\n")


def test_site_from_own_brat_folder(tmp_path):
  # A hospital's own brat export, one subfolder per split, labels renamed by the config.
  for split, n in (("train", 3), ("dev", 1), ("test", 1)):
    for i in range(n):
      _brat(tmp_path / "notes" / split, f"{split}{i}",
            f"Aspirin causes bleeding in patient {split} {i}.")
  c = _config()
  c.sites = {"hospital": dict(
      corpus=f"brat:{tmp_path / 'notes'}", tasks=("ner", "re"), unit="document",
      labels=dict(entity_map={"Drug": "Medication"},
                  entity_glosses={"Medication": "a drug", "Effect": "an effect"},
                  relation_glosses={"causes": "an effect of the marked drug"}))}
  site = sites_lib.build_sites(c).sites["hospital"]
  assert {s: len(d) for s, d in site.documents.items()} == {"train": 3, "dev": 1, "test": 1}
  ner = [e for e in site.examples["train"] if e.task == "ner"]
  assert len(ner) == 3 and '<span class="Medication">Aspirin</span>' in ner[0].target
  assert any(e.task == "re" for e in site.examples["train"])


def test_single_file_corpus_serves_one_split_only(tmp_path):
  path = tmp_path / "notes.tsv"
  path.write_text("Severe\tO\ngout\tB-Disease\n")
  c = _config()
  c.sites = {"ext": dict(corpus=f"iob:{path}", tasks=("ner",), unit="document")}
  with pytest.raises(DataError, match=r"config.sites.ext: corpus .* one collection without "
                                      r"splits, so it can serve one split only, not 3"):
    sites_lib.build_sites(c)
  c.sites = {"ext": dict(corpus=f"iob:{path}", tasks=("ner",), unit="document",
                         role="external", train_split=None, dev_split=None)}
  site = sites_lib.build_sites(c).sites["ext"]
  assert list(site.documents) == ["test"] and len(site.documents["test"]) == 1
