"""The deployed protocol, run in one process through the loopback transport: it computes
what the simulator computes, and it refuses what a deployment must refuse (an unknown key,
an upload replayed from another run), survives a site that stops answering and a
coordinator that restarts."""

import json

import jax
import numpy as np
import pytest

from fedjax_lora import experiment
from fedjax_lora.deploy import layout, loopback, protocol, records, server, site, wire
from fedjax_lora.errors import ConfigError, DataError, WireError
from fedjax_lora.security import audit, identity
from tests.test_federation import QUIET, _assert_trees_close, data, small_config  # noqa: F401


def _config(algorithm="fedavg", **overrides):
  return small_config(algorithm=algorithm, **{"eval.round_examples_per_task": 0,
                                               "security.keep_uploads": True, **overrides})


def _deploy(tmp_path, data, config, name="run", tamper=None, dead=()):
  """Lays out a deployment under tmp_path/name and runs it through the loopback: (final
  state, workdir, site dirs, loopback)."""
  workdir = tmp_path / name
  dirs = layout.lay_out(config, workdir, QUIET, data=data)
  runners = {i + 1: site.SiteRunner.open(d, QUIET) for i, d in enumerate(dirs.values())}
  lb = loopback.Loopback(runners, tamper)
  lb.dead.update(dead)
  return server.run_server(workdir, lb, QUIET), workdir, dirs, lb


def _nonce(workdir):
  return json.loads((workdir / server.RUN_FILE).read_text())["nonce"]


def _site_state(site_dir, nonce, r, template):
  data = (site_dir / "runs" / nonce / "state" / f"round_{r:06d}.bin").read_bytes()
  return wire.tree_like(template, identity.parse_tree_bytes(data))


def _blocks(workdir):
  return [json.loads(line) for line in (workdir / "ledger.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmedlora_plus", "dual_lora",
                                       "fedsa_lora"])
def test_the_loopback_deployment_equals_the_simulator_over_two_rounds(tmp_path, data,
                                                                      algorithm):
  config = _config(algorithm)
  state, workdir, dirs, _ = _deploy(tmp_path, data, config)
  simulated = config.copy_and_resolve_references()
  simulated.model.path = str(workdir / "base_model")  # the base every site installed
  (tmp_path / "sim").mkdir()
  fed = experiment.build(simulated, tmp_path / "sim", log=QUIET, data=data)
  fed.run_rounds()
  _assert_trees_close(jax.device_get(fed.state["global"]), jax.device_get(state["global"]))
  sim_sites = jax.device_get(fed.state["sites"])
  assert bool(sim_sites) == (algorithm in ("dual_lora", "fedsa_lora"))
  for k, site_dir in enumerate(dirs.values()):
    if sim_sites:  # what each site keeps (dual_lora's local adapter, fedsa_lora's B)
      mine = jax.tree.map(lambda x: x[k], sim_sites)
      _assert_trees_close(mine, _site_state(site_dir, _nonce(workdir), 2, mine))
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2]
  assert rows[-1]["weights"].keys() == {s.name for s in fed.sites}
  assert (workdir / "adapter" / "adapter_model.safetensors").exists()
  report = audit.audit_workdir(workdir)
  assert report.ok, report.first_problem()
  assert all(e["status"] == "accepted" for b in report.blocks[1:] for e in b["entries"])


def test_an_upload_replayed_from_an_earlier_run_with_the_same_keys_is_rejected(tmp_path,
                                                                                data):
  config = _config(**{"run.rounds": 1})
  _, first, dirs, lb = _deploy(tmp_path, data, config, "first")
  victim = 1  # node 1: the first site
  recorded = next(f for f in lb.up[victim] if wire.unpack(f).kind == protocol.UPLOAD)
  name = wire.unpack(recorded).meta["site"]

  def replay(node, frame, reply):  # an attacker on the wire resends run 1's signed upload
    if node == victim and wire.unpack(frame).kind == protocol.TRAIN:
      return recorded
    return reply
  # Run 2 with the same site keys (the same site directories) and the same round number.
  workdir = tmp_path / "second"
  workdir.mkdir()
  for f in (server.DEPLOY_FILE, "identity"):
    src = first / f
    dst = workdir / f
    if src.is_dir():
      dst.mkdir()
      (dst / identity.REGISTRY).write_bytes((src / identity.REGISTRY).read_bytes())
    else:
      dst.write_bytes(src.read_bytes())
  (workdir / server.VALIDATION_DIR).mkdir()
  for f in (first / server.VALIDATION_DIR).iterdir():
    (workdir / server.VALIDATION_DIR / f.name).write_bytes(f.read_bytes())
  runners = {i + 1: site.SiteRunner.open(d, QUIET) for i, d in enumerate(dirs.values())}
  server.run_server(workdir, loopback.Loopback(runners, replay), QUIET)
  assert _nonce(workdir) != _nonce(first)
  entries = {e["site"]: e["status"] for e in _blocks(workdir)[1]["entries"]}
  assert entries[name] == "rejected:replayed"
  assert all(s == "accepted" for n, s in entries.items() if n != name)

  # The same bytes claimed for this run fail the signature, which covers the run nonce.
  meta = wire.unpack(recorded).meta
  upload = identity.SignedUpload(1, meta["client_id"], meta["update_hash"],
                                 bytes.fromhex(meta["signature"]), _nonce(workdir))
  verifier = identity.UploadVerifier(identity.load_registry(workdir / "identity"),
                                     _nonce(workdir))
  with pytest.raises(identity.RejectedUpload, match="bad_signature"):
    verifier.verify(upload, 1, meta["update_hash"], meta["client_id"])
  assert audit.audit_workdir(workdir).ok


def test_a_node_with_an_unregistered_key_is_refused_and_the_run_completes(tmp_path, data):
  config = _config(**{"run.rounds": 1})
  workdir = tmp_path / "run"
  # The refused site never joins: the coordinator waits out `connect` before it goes on
  # (120 s by default); the loopback's nodes all answer at once, so 10 s is plenty.
  dirs = layout.lay_out(config, workdir, QUIET, data=data,
                        timeouts=server.Timeouts(connect=10.0))
  impostor = next(iter(dirs))
  # A node claiming the first site with a key of its own (not the registered one).
  fake = site.write_site_dir(tmp_path / "impostor", impostor,
                             json.loads((dirs[impostor] / site.SITE_FILE).read_text())["base"],
                             records.read_examples(dirs[impostor] / "data" / "train.jsonl"))
  runners = {1: site.SiteRunner.open(fake, QUIET)}
  runners.update({i + 2: site.SiteRunner.open(d, QUIET) for i, d in
                  enumerate(list(dirs.values())[1:])})
  lines = []
  server.run_server(workdir, loopback.Loopback(runners), lines.append)
  assert any(l.startswith("refused node 1:") and "unregistered key" in l for l in lines)
  block = _blocks(workdir)[1]
  assert {e["site"] for e in block["entries"]} == set(list(dirs)[1:])
  assert audit.audit_workdir(workdir).ok


def test_a_site_that_stops_answering_or_sends_garbage_is_absent_and_the_run_completes(
    tmp_path, data):
  config = _config("dual_lora")
  lost, garbled = {}, {}

  def faults(node, frame, reply):
    msg = wire.unpack(frame)
    if node == 3 and msg.kind == protocol.TRAIN and msg.meta["round"] == 2:
      lost["site"] = msg.meta["site"]
      return "timeout"
    if node == 2 and msg.kind == protocol.TRAIN and msg.meta["round"] == 1:
      garbled["site"] = msg.meta["site"]
      return {**reply, protocol.PAYLOAD: b"not|a|tree\n" + b"\0" * 64}
    return reply
  lines = []
  workdir = tmp_path / "run"
  dirs = layout.lay_out(config, workdir, QUIET, data=data)
  runners = {i + 1: site.SiteRunner.open(d, QUIET) for i, d in enumerate(dirs.values())}
  server.run_server(workdir, loopback.Loopback(runners, faults), lines.append)
  assert any(f"{garbled['site']}'s reply is malformed" in l for l in lines)
  first = {e["site"]: e["status"] for e in _blocks(workdir)[1]["entries"]}
  assert first[garbled["site"]] == "absent"
  statuses = {e["site"]: e["status"] for e in _blocks(workdir)[2]["entries"]}
  assert statuses[lost["site"]] == "absent"
  assert sorted(statuses.values()).count("accepted") == 2
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert lost["site"] not in rows[1]["weights"]
  # The lost site trained round 2 (its reply never arrived): that state stays pending.
  nonce = _nonce(workdir)
  assert not (dirs[lost["site"]] / "runs" / nonce / "state" / "round_000002.bin").exists()
  assert (dirs[lost["site"]] / "runs" / nonce / "pending" / "round_000002.bin").exists()
  assert audit.audit_workdir(workdir).ok


def test_a_restarted_coordinator_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(
    tmp_path, data):
  config = _config("dual_lora", **{"run.rounds": 3})
  whole, *_ = _deploy(tmp_path, data, config, "whole")

  class Killed(Exception):
    pass

  def die_in_round_three(node, frame, reply):
    if wire.unpack(frame).kind == protocol.TRAIN and wire.unpack(frame).meta["round"] == 3:
      raise Killed  # the coordinator dies with round 3's uploads in flight
    return reply
  workdir = tmp_path / "restarted"
  dirs = layout.lay_out(config, workdir, QUIET, data=data)
  runners = {i + 1: site.SiteRunner.open(d, QUIET) for i, d in enumerate(dirs.values())}
  with pytest.raises(Killed):
    server.run_server(workdir, loopback.Loopback(runners, die_in_round_three), QUIET)
  lines = []
  resumed = server.run_server(workdir, loopback.Loopback(runners), lines.append)
  assert "coordinator resumed from round 2" in lines
  for x, y in zip(jax.tree.leaves(jax.device_get(whole["global"])),
                  jax.tree.leaves(jax.device_get(resumed["global"]))):
    np.testing.assert_array_equal(x, y)
  assert audit.audit_workdir(workdir).ok


def test_bad_frames_and_records_are_refused_with_the_field_named(tmp_path):
  with pytest.raises(WireError, match="kind"):
    wire.unpack({"meta": b"{}"})
  with pytest.raises(WireError, match="hello frame: field 'meta' is not JSON"):
    wire.unpack({"kind": b"hello", "meta": b"{oops"})
  path = tmp_path / "train.jsonl"
  path.write_text('{"source": "x"}\nnot json\n')
  with pytest.raises(DataError, match=r"train.jsonl:1: not an example record"):
    records.read_examples(path)
  with pytest.raises(ConfigError, match="secure_aggregation: a deployment needs"):
    server.refuse_unsupported(_config(**{"security.secure_aggregation": True,
                                         "security.ledger": False}))
  with pytest.raises(ConfigError, match="injected faults are a simulation feature"):
    server.refuse_unsupported(_config(**{"faults.sites": "a:nan"}))


def test_deployed_secure_aggregation_matches_the_plain_mean_and_recovers_a_site_lost_after_dealing(
    tmp_path, data):
  config = _config(**{"security.secure_aggregation": True, "security.keep_uploads": False})
  plain, *_ = _deploy(tmp_path, data, _config(**{"security.keep_uploads": False}), "plain")
  secure, workdir, dirs, lb = _deploy(tmp_path, data, config, "secure")
  # Fixed point with 24 fractional bits: the unmasked mean is within 2^-24 per site of the
  # plain one (the simulator's secure-aggregation tests bound it exactly).
  _assert_trees_close(jax.device_get(plain["global"]), jax.device_get(secure["global"]),
                      atol=1e-6)
  # The coordinator relayed every share sealed: no frame it sent or received carries one
  # in the clear (a share is revealed only for the unmasking, one kind per owner).
  for node, frames in lb.down.items():
    for f in frames:
      if wire.unpack(f).kind == protocol.TRAIN:
        assert all(len(bytes.fromhex(c)) > 28 for c in wire.unpack(f).meta["shares"].values())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(r["secagg"]["survivors"] == 3 for r in rows)

  def lose_after_dealing(node, frame, reply):  # node 2 deals its shares, then is gone
    if node == 2 and wire.unpack(frame).kind in (protocol.TRAIN, protocol.SECAGG_REVEAL):
      return "timeout"
    return reply
  _, workdir, *_ = _deploy(tmp_path, data, config, "lost", tamper=lose_after_dealing)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["secagg"] for r in rows] == [{"survivors": 2, "recovered_dropouts": 1}] * 2
  assert len(rows[0]["weights"]) == 2
  assert audit.audit_workdir(workdir).ok


def test_deploy_local_refuses_a_resume_without_a_deployment_and_a_second_start(tmp_path):
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parent.parent
  run = lambda *flags: subprocess.run([sys.executable, "-m", "launch.deploy_local",
                                       f"--workdir={tmp_path}", *flags], capture_output=True,
                                      text=True, cwd=repo, timeout=300)
  out = run("--resume")
  assert out.returncode != 0 and "deploy.json does not exist" in out.stderr
  (tmp_path / server.DEPLOY_FILE).write_text("{}")
  out = run()
  assert out.returncode != 0 and "already holds a deployment" in out.stderr
