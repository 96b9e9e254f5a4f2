"""Signed uploads, the audit ledger, faulty and malicious sites, quarantine, secure
aggregation inside a federation, and crash safety (kill -9, corrupted checkpoints)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedjax_lora import experiment, mesh as mesh_lib
from fedjax_lora.client import steps_per_round
from fedjax_lora.security import audit, identity, ledger as ledger_lib
from fedjax_lora.errors import ConfigError
from tests.test_federation import REPO, build, data, small_config  # noqa: F401  (data: fixture)

SITES = ("discharge_summary", "narrative_hospital", "telegraphic_clinic")


def _global(fed):
  return jax.tree.map(np.asarray, fed.state["global"])


def _dist(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


# ---- identity ------------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
  ids = identity.ensure_identities(tmp_path, ["a", "b"])
  return ids, identity.UploadVerifier(identity.load_registry(tmp_path))


def test_valid_upload_verifies_and_every_bad_one_is_rejected(keys):
  ids, verifier = keys
  h = identity.bytes_hash(b"update of a")
  verifier.verify(identity.sign_upload(ids["a"], 3, h), 3, h)
  bad = {
      "unsigned": identity.SignedUpload(3, ids["b"].client_id, h, None),
      "unregistered": identity.sign_upload(
          identity.SiteIdentity("x", ed25519.Ed25519PrivateKey.generate()), 3, h),
      "replayed": identity.sign_upload(ids["b"], 2, h),
      "hash_mismatch": identity.sign_upload(ids["b"], 3, identity.bytes_hash(b"other")),
      "bad_signature": identity.SignedUpload(  # b's id, signed with someone else's key
          3, ids["b"].client_id, h,
          ed25519.Ed25519PrivateKey.generate().sign(
              identity.signed_message(3, ids["b"].client_id, h))),
      "duplicate": identity.sign_upload(ids["a"], 3, h),
  }
  for reason, upload in bad.items():
    with pytest.raises(identity.RejectedUpload) as e:
      verifier.verify(upload, 3, h)
    assert e.value.reason == reason


def test_a_valid_upload_of_another_site_is_not_this_sites_upload(keys):
  ids, verifier = keys
  h = identity.bytes_hash(b"update of b")
  with pytest.raises(identity.RejectedUpload) as e:
    verifier.verify(identity.sign_upload(ids["b"], 1, h), 1, h, ids["a"].client_id)
  assert e.value.reason == "wrong_client"
  verifier.verify(identity.sign_upload(ids["b"], 1, h), 1, h, ids["b"].client_id)


def test_label_flip_permutes_supervised_tokens_only():
  from fedjax_lora import faults
  perm = faults.label_permutation(50, (0, 1, 2), seed=3)
  assert sorted(perm) == list(range(50)) and list(perm[:3]) == [0, 1, 2]
  tokens = np.arange(5, 25).reshape(2, 10)
  loss = np.zeros((2, 10), np.float32)
  loss[:, 6:] = 1
  out = faults.flip_labels({"tokens": tokens, "loss_mask": loss}, perm)["tokens"]
  np.testing.assert_array_equal(out[:, :6], tokens[:, :6])
  np.testing.assert_array_equal(out[:, 6:], perm[tokens[:, 6:]])
  assert (out[:, 6:] != tokens[:, 6:]).any()


def test_serialization_is_deterministic_and_sensitive():
  tree = {"q": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}}
  same = {"q": {"b": np.ones(2, np.float32), "a": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  assert identity.tree_hash(tree) == identity.tree_hash(same)
  changed = jax.tree.map(lambda x: x.copy(), tree)
  changed["q"]["a"][1, 2] = np.nextafter(changed["q"]["a"][1, 2], 10)
  assert identity.tree_hash(tree) != identity.tree_hash(changed)
  as_f64 = jax.tree.map(lambda x: x.astype(np.float64), tree)
  assert identity.tree_hash(tree) != identity.tree_hash(as_f64)


def test_bad_key_files_name_the_file(tmp_path):
  identity.ensure_identities(tmp_path, ["a"])
  (tmp_path / "keys" / "a.pem").write_text("not a key")
  with pytest.raises(identity.IdentityError, match=r"a\.pem: not an unencrypted PEM"):
    identity.ensure_identities(tmp_path, ["a"])
  (tmp_path / identity.REGISTRY).write_text('{"a": {"public_key": "zz"}}')
  with pytest.raises(identity.IdentityError, match=r"registry\.json: site 'a': bad entry"):
    identity.load_registry(tmp_path)
  (tmp_path / identity.REGISTRY).write_text("{")
  with pytest.raises(identity.IdentityError, match=r"registry\.json: not valid JSON \(line 1"):
    identity.load_registry(tmp_path)


# ---- ledger and audit ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ledger_run(data, tmp_path_factory):
  """A 3-round run with a malicious site (forged signature from round 2 on)."""
  workdir = tmp_path_factory.mktemp("ledger_run")
  fed = build(data, workdir=workdir, **{"run.rounds": 3, "run.keep_last": 3,
                                        "faults.sites": "telegraphic_clinic:forged",
                                        "faults.start_round": 2})
  fed.run_rounds()
  fed.checkpointer.close()
  return workdir, fed


def _copy(workdir, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(workdir, out)
  return out


def test_a_valid_run_verifies_and_records_every_upload(ledger_run):
  workdir, fed = ledger_run
  report = audit.audit_workdir(workdir)
  assert report.ok, report.first_problem()
  assert [b["round"] for b in report.blocks] == [0, 1, 2, 3]
  assert report.checkpoints == {1: "ok", 2: "ok", 3: "ok"}
  statuses = {b["round"]: {e["site"]: e["status"] for e in b["entries"]}
              for b in report.blocks[1:]}
  assert statuses[1] == {s: "accepted" for s in SITES}
  for r in (2, 3):
    assert statuses[r]["telegraphic_clinic"] == "rejected:bad_signature"
    assert fed.history[r - 1]["weights"].keys() == {"discharge_summary", "narrative_hospital"}
  weights = {e["site"]: e["weight"] for e in report.blocks[1]["entries"]}
  assert weights == pytest.approx(fed.history[0]["weights"])
  assert report.blocks[3]["global_hash"] == identity.tree_hash(fed.state["global"])
  # Rounds with and without rejected sites reuse one executable per phase.
  assert fed.train_fn._cache_size() == 1 and fed.aggregate_fn._cache_size() == 1
  proc = subprocess.run([sys.executable, "-m", "launch.audit", f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "audit: OK (4 blocks, 3 checkpoints verified)" in proc.stdout


def test_editing_a_past_block_is_found_at_its_line(ledger_run, tmp_path):
  workdir = _copy(ledger_run[0], tmp_path)
  path = workdir / ledger_lib.FILENAME
  lines = path.read_text().splitlines()
  lines[1] = lines[1].replace('"weight": 0.3', '"weight": 0.4', 1)  # one byte of round 1
  assert lines[1] != path.read_text().splitlines()[1]
  path.write_text("\n".join(lines) + "\n")
  report = audit.audit_workdir(workdir)
  assert (report.broken.line, report.broken.round) == (2, 1)
  assert "edited" in report.broken.reason
  proc = subprocess.run([sys.executable, "-m", "launch.audit", f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "audit: FAILED: ledger line 2 (round 1): content does not match" in proc.stdout


def test_reordered_blocks_are_found_where_the_order_breaks(ledger_run, tmp_path):
  workdir = _copy(ledger_run[0], tmp_path)
  path = workdir / ledger_lib.FILENAME
  lines = path.read_text().splitlines()
  lines[2], lines[3] = lines[3], lines[2]
  path.write_text("\n".join(lines) + "\n")
  broken = audit.audit_workdir(workdir).broken
  assert broken.line == 3 and broken.round == 3 and "reordered" in broken.reason


def test_a_modified_checkpoint_is_found(ledger_run, tmp_path):
  workdir = _copy(ledger_run[0], tmp_path)
  _corrupt_checkpoint(workdir / "checkpoints" / "2")
  report = audit.audit_workdir(workdir)
  assert report.broken is None
  assert report.checkpoints[1] == "ok" and report.checkpoints[3] == "ok"
  assert report.checkpoints[2] != "ok"
  assert report.first_problem().startswith("checkpoint of round 2:")


def _corrupt_checkpoint(step_dir):
  """Flips one byte in the middle of the array data (OCDBT keeps the data file once under
  state/d and once in the per-process store; both copies get the same flip)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  size = max(p.stat().st_size for p in files)
  for target in (p for p in files if p.stat().st_size == size):
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def replay_run(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("replay_run")
  fed = build(data, workdir=workdir, **{"run.rounds": 2, "security.keep_uploads": True,
                                        "faults.sites": "narrative_hospital:scale",
                                        "security.max_update_norm": 5.0})
  fed.run_rounds()
  fed.checkpointer.close()
  return workdir


def test_stored_uploads_replay_to_the_recorded_global(replay_run):
  report = audit.audit_workdir(replay_run)
  assert report.ok, report.first_problem()
  assert all(v.startswith("ok (replayed") for v in report.uploads.values())
  assert set(report.uploads) == {1, 2}
  # The scaled site was received (its upload is kept for forensics) but not aggregated.
  status = {e["site"]: e["status"] for e in report.blocks[1]["entries"]}
  assert status["narrative_hospital"] == "quarantined:norm"
  assert (replay_run / "uploads" / "round_000001" / "narrative_hospital.bin").is_file()


def test_a_rewritten_history_with_valid_hashes_fails_the_replay(replay_run, tmp_path):
  """A server that changes a weight and re-hashes the whole chain keeps the chain valid,
  but the stored uploads no longer average to the recorded global adapter."""
  workdir = _copy(replay_run, tmp_path)
  path = workdir / ledger_lib.FILENAME
  blocks = [json.loads(l) for l in path.read_text().splitlines()]
  accepted = [e for e in blocks[1]["entries"] if e["status"] == "accepted"]
  accepted[0]["weight"], accepted[1]["weight"] = accepted[1]["weight"], accepted[0]["weight"]
  prev = ledger_lib.ZERO_HASH
  for b in blocks:
    b["prev"] = prev
    b["hash"] = ledger_lib.block_hash(b)
    prev = b["hash"]
  path.write_text("".join(json.dumps(b, sort_keys=True) + "\n" for b in blocks))
  report = audit.audit_workdir(workdir)
  assert report.broken is None
  assert "not the recorded weighted mean" in report.uploads[1]
  assert report.first_problem().startswith("uploads of round 1")


def test_a_modified_stored_upload_is_found(replay_run, tmp_path):
  workdir = _copy(replay_run, tmp_path)
  f = workdir / "uploads" / "round_000002" / "discharge_summary.bin"
  data = bytearray(f.read_bytes())
  data[-3] ^= 0x01
  f.write_bytes(bytes(data))
  report = audit.audit_workdir(workdir)
  assert report.uploads[2] == ("the stored upload of discharge_summary differs from the hash "
                               "it was signed with")


def test_an_edited_signature_is_found_even_in_a_rehashed_chain(replay_run, tmp_path):
  workdir = _copy(replay_run, tmp_path)
  path = workdir / ledger_lib.FILENAME
  blocks = [json.loads(l) for l in path.read_text().splitlines()]
  entry = next(e for e in blocks[2]["entries"] if e["status"] == "accepted")
  entry["update_hash"] = identity.bytes_hash(b"a different update")
  prev = ledger_lib.ZERO_HASH
  for b in blocks:
    b["prev"], b["hash"] = prev, None
    b["hash"] = prev = ledger_lib.block_hash(b)
  path.write_text("".join(json.dumps(b, sort_keys=True) + "\n" for b in blocks))
  report = audit.audit_workdir(workdir)
  assert report.broken is None
  assert "bad_signature" in report.signatures[2]
  assert report.first_problem().startswith("signatures of round 2")


def test_resume_without_the_ledger_it_needs_moves_nothing(replay_run, data, tmp_path):
  from fedjax_lora.errors import ResumeError
  workdir = _copy(replay_run, tmp_path)
  (workdir / ledger_lib.FILENAME).unlink()
  fed = build(data, workdir=workdir, **{"run.rounds": 2, "security.keep_uploads": True,
                                        "faults.sites": "narrative_hospital:scale",
                                        "security.max_update_norm": 5.0})
  with pytest.raises(ResumeError, match="security.ledger=False"):
    fed.resume()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  other = build(data, workdir=_copy(replay_run, tmp_path / "b"),
                **{"run.rounds": 2, "keep_optimizer_state": True})
  with pytest.raises(ResumeError, match="does not match the restore target"):
    other.resume()


def test_a_resumed_run_may_go_on_for_more_rounds(replay_run, data, tmp_path):
  workdir = _copy(replay_run, tmp_path)
  kw = {"security.keep_uploads": True, "faults.sites": "narrative_hospital:scale",
        "security.max_update_norm": 5.0}
  fed = build(data, workdir=workdir, **{"run.rounds": 3, **kw})
  assert fed.resume() == 2
  fed.run_rounds()
  fed.checkpointer.close()
  assert audit.audit_workdir(workdir).ok


def test_replayed_and_unsigned_uploads_are_rejected_in_a_round(data, tmp_path):
  fed = build(data, workdir=tmp_path, **{
      "run.rounds": 2, "faults.sites": "narrative_hospital:replay,discharge_summary:unsigned"})
  fed.run_rounds()
  row = fed.history[-1]
  assert row["rejected"] == {"narrative_hospital": "replayed", "discharge_summary": "unsigned"}
  assert set(row["weights"]) == {"telegraphic_clinic"}


# ---- faults and quarantine -----------------------------------------------------------------------

def test_a_nan_site_is_quarantined_and_the_rest_are_aggregated(data):
  ref = build(data, **{"security.ledger": False, "faults.sites": "narrative_hospital:dropout"})
  ref.step()
  for path_kw in ({"security.ledger": False}, {}):  # fused round, and split round
    fed = build(data, **path_kw, **{"faults.sites": "narrative_hospital:nan"})
    row = fed.step()
    assert row["quarantined_nonfinite"] == ["narrative_hospital"]
    assert set(row["weights"]) == {"discharge_summary", "telegraphic_clinic"}
    for x, y in zip(jax.tree.leaves(_global(fed)), jax.tree.leaves(_global(ref))):
      assert np.isfinite(x).all()
      np.testing.assert_allclose(x, y, atol=1e-6)


def test_fedsa_personal_factors_do_not_count_toward_the_norm_bound(data):
  """fedsa_lora's B stays at the site, so only A's change is the site's update."""
  fed = build(data, **{"security.ledger": False, "algorithm": "fedsa_lora", "run.rounds": 2})
  fed.run_rounds()
  a_only = max(max(r["update_norm"].values()) for r in fed.history)
  bounded = build(data, **{"security.ledger": False, "algorithm": "fedsa_lora",
                           "run.rounds": 2, "security.max_update_norm": 1.01 * a_only})
  bounded.run_rounds()
  assert not any(r.get("quarantined_norm") for r in bounded.history)


def test_zero_noise_dp_is_logged_as_infinite_epsilon_in_the_ledger(data, tmp_path):
  fed = build(data, workdir=tmp_path, **{"privacy.example_clip": 1.0, "run.rounds": 1})
  fed.run_rounds()
  fed.checkpointer.close()
  assert all(e == float("inf") for e in fed.history[0]["epsilon"].values())
  block = ledger_lib.Ledger(tmp_path).block(1)
  assert set(block["epsilon"].values()) == {"inf"}
  assert audit.audit_workdir(tmp_path).ok


def test_secure_aggregation_with_too_few_sites_keeps_the_global(data):
  fed = build(data, **{"security.ledger": False, "security.secure_aggregation": True,
                       "faults.sites": "telegraphic_clinic:dropout,"
                                       "narrative_hospital:drop_after_masking"})
  start = _global(fed)
  row = fed.step()
  assert row["weights"] == {}
  assert row["secagg_dropped"] == {"discharge_summary": "no_quorum",
                                   "narrative_hospital": "dropped_after_masking"}
  for x, y in zip(jax.tree.leaves(_global(fed)), jax.tree.leaves(start)):
    np.testing.assert_array_equal(x, y)


def test_norm_bound_quarantines_a_scaled_update(data):
  clean = build(data, **{"security.ledger": False})
  clean.step()
  bound = 3 * max(clean.history[0]["update_norm"].values())
  fed = build(data, **{"security.ledger": False, "security.max_update_norm": bound,
                       "faults.sites": "discharge_summary:scale"})
  row = fed.step()
  assert row["quarantined_norm"] == ["discharge_summary"]
  assert row["update_norm"]["discharge_summary"] > 30 * bound / 3


ROBUST = ("fedavg", "median", "trimmed_mean")


def _robust_kw(algorithm):
  return {"security.ledger": False, "algorithm": algorithm, "aggregator.trim": 0.34}


@pytest.fixture(scope="module")
def clean_rounds(data):
  """Initial adapter and each rule's clean one-round result (3 sites, nobody faulty)."""
  out = {}
  for algorithm in ROBUST:
    fed = build(data, **_robust_kw(algorithm))
    out["start"] = _global(fed)
    fed.step()
    out[algorithm] = _global(fed)
  return out


@pytest.mark.parametrize("fault", ["scale", "sign_flip"])
def test_robust_aggregators_resist_one_bad_site_where_fedavg_does_not(data, clean_rounds, fault):
  """Three sites, one faulty; distance of the faulty run's global to the clean run's,
  relative to the clean update. (Label flips: unit test above and launch.fault_study.)"""
  errors = {}
  for algorithm in ROBUST:
    bad = build(data, **_robust_kw(algorithm), **{"faults.sites": f"discharge_summary:{fault}"})
    bad.step()
    clean = clean_rounds[algorithm]
    errors[algorithm] = _dist(_global(bad), clean) / _dist(clean, clean_rounds["start"])
  if fault == "scale":
    assert errors["fedavg"] > 10
    assert errors["median"] < 1.5 and errors["trimmed_mean"] < 1.5
  else:
    assert errors["median"] < errors["fedavg"] and errors["trimmed_mean"] < errors["fedavg"]


# ---- secure aggregation in a federation ----------------------------------------------------------

def test_secure_aggregation_matches_fedavg_within_quantization(data):
  plain = build(data, **{"security.ledger": False})
  plain.run_rounds()
  secure = build(data, **{"security.ledger": False, "security.secure_aggregation": True})
  secure.run_rounds()
  for row in secure.history:
    assert row["secagg"]["quantization_error"] <= row["secagg"]["quantization_bound"] < 1e-5
  for x, y in zip(jax.tree.leaves(_global(secure)), jax.tree.leaves(_global(plain))):
    np.testing.assert_allclose(x, y, atol=2e-5)


def test_dropout_after_masking_is_recovered(data, tmp_path):
  ref = build(data, **{"security.ledger": False, "faults.sites": "telegraphic_clinic:dropout"})
  ref.step()
  fed = build(data, workdir=tmp_path, **{"security.secure_aggregation": True,
                                          "faults.sites": "telegraphic_clinic:drop_after_masking"})
  row = fed.step()
  assert row["secagg"]["recovered_dropouts"] == 1
  assert set(row["weights"]) == {"discharge_summary", "narrative_hospital"}
  for x, y in zip(jax.tree.leaves(_global(fed)), jax.tree.leaves(_global(ref))):
    np.testing.assert_allclose(x, y, atol=2e-5)
  block = ledger_lib.Ledger(tmp_path).block(1)
  status = {e["site"]: e["status"] for e in block["entries"]}
  assert status["telegraphic_clinic"] == "dropped:dropped_after_masking"


@pytest.mark.parametrize("overrides,needle", [
    ({"algorithm": "fedmedlora_plus"}, "scores every site's adapter"),
    ({"algorithm": "median"}, "order statistics"),
    ({"algorithm": "trimmed_mean"}, "sorts individual updates"),
    ({"security.max_update_norm": 1.0}, "never sees an individual update"),
])
def test_secure_aggregation_rejects_what_needs_individual_updates(overrides, needle):
  c = small_config(**{"security.secure_aggregation": True, **overrides})
  with pytest.raises(ConfigError, match=needle):
    experiment.check_config(c)


@pytest.mark.parametrize("overrides,needle", [
    ({"faults.sites": "nowhere:nan"}, "unknown site 'nowhere'"),
    ({"faults.sites": "narrative_hospital:melt"}, "unknown fault 'melt'"),
    ({"faults.sites": "narrative_hospital"}, "must be 'site:kind'"),
    ({"faults.sites": "narrative_hospital:forged", "security.ledger": False}, "ledger=True"),
    ({"faults.sites": "narrative_hospital:drop_after_masking"}, "secure_aggregation=True"),
    ({"security.max_update_norm": -1.0}, "max_update_norm must be >= 0"),
])
def test_bad_fault_and_security_settings_name_the_field(overrides, needle):
  with pytest.raises(ConfigError, match=needle):
    experiment.check_config(small_config(**overrides))


# ---- crash safety --------------------------------------------------------------------------------

FLAGS = ["--config=configs/federate.py:tiny", "--config.run.rounds=3", "--config.run.keep_last=2", "--config.model.hidden_size=32",
         "--config.model.intermediate_size=64", "--config.model.num_layers=1",
         "--config.lora.rank=4", "--config.eval.round_examples_per_task=0",
         *[f"--config.data.sites.{s}.max_train_examples=6" for s in SITES]]


def _federate(workdir, *extra, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "launch.federate", f"--workdir={workdir}",
                           *FLAGS, *extra], cwd=REPO, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, **kw)


def _final_global(workdir):
  from fedjax_lora.checkpointing import RoundCheckpointer
  with RoundCheckpointer(workdir / "checkpoints", keep_last=None) as c:
    state, _ = c.restore_on_host(c.latest_round())
  return int(state["round"]), state["global"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  full = _federate(workdir)
  assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]
  return _final_global(workdir)


@pytest.mark.parametrize("after,delay", [("round   1", 0.0), ("round   2", 0.3)])
def test_kill_9_mid_run_then_resume_gives_identical_adapters(uninterrupted, tmp_path, after,
                                                             delay):
  """Killed right after a round is logged (its checkpoint still being written) or partway
  into the next round; the resumed run must end bit-identical to the uninterrupted one."""
  killed = _federate(tmp_path)
  for line in killed.stderr:
    if line.startswith(after):
      time.sleep(delay)
      break
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)
  assert killed.returncode == -signal.SIGKILL
  resumed = _federate(tmp_path, "--resume")
  assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
  r_full, g_full = uninterrupted
  r_res, g_res = _final_global(tmp_path)
  assert r_full == r_res == 3
  for x, y in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_res)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert audit.audit_workdir(tmp_path).ok
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("setting", [
    {"privacy.example_clip": 0.5, "privacy.example_noise": 1.0},
    {"security.secure_aggregation": True},
])
def test_resume_is_exact_with_dp_and_secure_aggregation(data, tmp_path, setting):
  kw = {"run.rounds": 2, **setting}
  full = build(data, workdir=tmp_path / "full", **kw)
  full.run_rounds()
  part = build(data, workdir=tmp_path / "part", **kw)
  part.run_rounds(until=1)
  part.checkpointer.close()
  resumed = build(data, workdir=tmp_path / "part", **kw)
  assert resumed.resume() == 1
  resumed.run_rounds()
  for x, y in zip(jax.tree.leaves(full.checkpoint_state()),
                  jax.tree.leaves(resumed.checkpoint_state())):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if "privacy.example_noise" in setting:
    assert resumed.history[-1]["epsilon"] == full.history[-1]["epsilon"]
  resumed.checkpointer.close()
  assert audit.audit_workdir(tmp_path / "part").ok


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(ledger_run, data, tmp_path):
  workdir = _copy(ledger_run[0], tmp_path)
  _corrupt_checkpoint(workdir / "checkpoints" / "3")
  logs = []
  fed = experiment.build(small_config(**{"run.rounds": 3, "run.keep_last": 3,
                                         "faults.sites": "telegraphic_clinic:forged",
                                         "faults.start_round": 2}),
                         workdir, log=logs.append, mesh=mesh_lib.make_mesh(1, 1), data=data)
  assert fed.resume() == 2
  assert any("WARNING: checkpoint of round 3" in l for l in logs)
  assert (workdir / "checkpoints_rejected" / "3").is_dir()
  fed.run_rounds()
  for x, y in zip(jax.tree.leaves(_global(fed)), jax.tree.leaves(_global(ledger_run[1]))):
    np.testing.assert_array_equal(x, y)
  assert audit.audit_workdir(workdir).ok


# ---- differential privacy in a federation --------------------------------------------------------

def _independent_rdp_epsilon(sigma, q, steps, delta):
  import dp_accounting
  orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
  acc = dp_accounting.rdp.RdpAccountant(orders)
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return acc.get_epsilon(delta)


def test_federation_reports_the_epsilon_dp_accounting_computes(data):
  fed = build(data, **{"security.ledger": False, "privacy.example_clip": 0.5,
                       "privacy.example_noise": 1.1, "privacy.delta": 1e-4, "run.rounds": 2})
  fed.run_rounds()
  per_step = fed.run.batch_size * fed.run.accumulation
  steps = {s.name: 0 for s in fed.sites}
  for r, row in enumerate(fed.history, start=1):
    idx, present, *_ = fed.round_inputs(r)
    for k, p in zip(idx, present):
      s = fed.sites[k]
      steps[s.name] += int(p) * steps_per_round(len(s.train), fed.run.batch_size,
                                           fed.run.accumulation, fed.run.epochs)
    for s in fed.sites:
      want = _independent_rdp_epsilon(1.1, per_step / len(s.train), steps[s.name], 1e-4)
      assert row["epsilon"][s.name] == pytest.approx(want, rel=2e-2)
  assert fed.history[1]["epsilon"]["discharge_summary"] > fed.history[0]["epsilon"][
      "discharge_summary"]


def test_target_epsilon_is_met_by_the_calibrated_noise(data):
  logs = []
  c = small_config(**{"security.ledger": False, "privacy.example_clip": 1.0,
                      "privacy.example_target_epsilon": 8.0, "run.rounds": 2})
  fed = experiment.build(c, None, log=logs.append, mesh=mesh_lib.make_mesh(1, 1), data=data)
  assert any("DP-SGD: noise multiplier" in l for l in logs)
  fed.run_rounds()
  eps = fed.history[-1]["epsilon"]
  assert max(eps.values()) <= 8.0 and max(eps.values()) > 7.0  # the binding site is at target


def test_client_level_dp_fedavg_reports_its_epsilon(data):
  fed = build(data, **{"security.ledger": False, "algorithm": "dp_fedavg",
                       "privacy.client_clip": 0.05, "privacy.client_noise": 0.8,
                       "run.clients_per_round": 2})
  fed.run_rounds()
  for r, row in enumerate(fed.history, start=1):
    assert row["client_epsilon"] == pytest.approx(
        _independent_rdp_epsilon(0.8, 2 / 3, r, 1e-5), rel=2e-2)
    assert row["noise_std"] == pytest.approx(0.8 * 0.05 / 2, rel=1e-5)


# ---- bad input: one clear line -------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["launch.audit"], "error: .*ledger.jsonl: no ledger"),
    (["launch.federate", "--config.faults.sites=nowhere:nan"],
     "error: config.faults.sites: unknown site 'nowhere'"),
    (["launch.federate", "--config.security.secure_aggregation=True",
      "--config.algorithm=median"], "error: config.security.secure_aggregation cannot be "
                                    "combined with config.algorithm=median"),
    (["launch.federate", "--config.privacy.example_noise=1.0"],
     "error: config.privacy.example_clip must be > 0"),
])
def test_launchers_print_one_error_line(tmp_path, args, needle):
  tiny = ["--config=configs/federate.py:tiny"] if args[0] == "launch.federate" else []
  proc = subprocess.run([sys.executable, "-m", args[0], *tiny, *args[1:], f"--workdir={tmp_path}"],
                        cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr
  import re
  assert re.search(needle, lines[0]), lines[0]


def test_a_tampered_key_file_stops_a_resume_with_one_clear_error(ledger_run, data, tmp_path):
  workdir = _copy(ledger_run[0], tmp_path)
  (workdir / "identity" / "keys" / "narrative_hospital.pem").write_text("garbage")
  fed = build(data, workdir=workdir, **{"run.rounds": 3, "run.keep_last": 3,
                                        "faults.sites": "telegraphic_clinic:forged",
                                        "faults.start_round": 2})
  with pytest.raises(identity.IdentityError, match=r"narrative_hospital\.pem"):
    fed.resume()
