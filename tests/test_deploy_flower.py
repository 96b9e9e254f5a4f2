"""A real Flower deployment on this machine (SuperLink, one SuperNode and resident worker per
site, `flwr run`): it computes exactly what the loopback computes, its audit trail verifies,
and it survives an impostor node, a site killed mid-run and a coordinator killed mid-run.
Each test starts its own processes and must leave none behind; run serially
(`pytest -m deploy`)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower deployment needs the [deploy] extra")

from fedjax_lora import checkpointing  # noqa: E402
from fedjax_lora.deploy import harness, layout, loopback, records, server, site  # noqa: E402
from fedjax_lora.security import audit  # noqa: E402
from tests.test_deploy import QUIET, _blocks, _config, data  # noqa: E402,F401

pytestmark = pytest.mark.deploy
REPO = Path(__file__).resolve().parent.parent
# A killed node answers nothing until its heartbeat lapses (about a minute in Flower 1.42):
# a short round deadline keeps the test short (the first round waits `hello`: it compiles).
FAST = server.Timeouts(connect=120.0, hello=300.0, round=20.0, decision=10.0)
# The suite's XLA cache: a site's program compiled by an earlier test is loaded, not rebuilt.
ENV = {k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR",
                                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
       if k in os.environ}


def _final_global(workdir):
  ckpt = checkpointing.RoundCheckpointer(workdir / "checkpoints", keep_last=None)
  try:
    state, _ = ckpt.restore_on_host(ckpt.latest_round())
  finally:
    ckpt.close()
  return state["global"]


def _assert_equal_trees(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _assert_equal_trees(a[k], b[k])
    else:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
  """The 3-round fedavg run of the loopback: what every Flower run below must equal."""
  workdir = tmp_path_factory.mktemp("loopback")
  dirs = layout.lay_out(_config("fedavg", **{"run.rounds": 3}), workdir, QUIET, data=data)
  runners = {i + 1: site.SiteRunner.open(d, QUIET) for i, d in enumerate(dirs.values())}
  server.run_server(workdir, loopback.Loopback(runners), QUIET)
  return _final_global(workdir)


def _rows(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_a_flower_deployment_equals_the_loopback_bit_for_bit_refuses_an_impostor_and_audits(
    tmp_path, data, reference):
  config = _config("fedavg", **{"run.rounds": 3})
  workdir = tmp_path / "flower"
  dirs = layout.lay_out(config, workdir, QUIET, data=data, timeouts=FAST)
  first = next(iter(dirs))
  # A fourth node claims the first site with a key the coordinator never registered.
  impostor = site.write_site_dir(
      tmp_path / "impostor", first, json.loads((dirs[first] / site.SITE_FILE).read_text())[
          "base"], records.read_examples(dirs[first] / "data" / "train.jsonl"))
  nodes = {**{n: str(d) for n, d in dirs.items()}, "impostor": str(impostor)}
  with harness.LocalDeployment(str(workdir), nodes, resident_workers=True, log=QUIET,
                               env=ENV) as deployment:
    deployment.run(timeout=900)
    tag = deployment.tag
  assert harness.tagged_processes(tag) == []
  server_log = (workdir / "logs").glob("*")
  assert any("unregistered key" in p.read_text(errors="replace") for p in server_log)
  _assert_equal_trees(_final_global(workdir), reference)
  out = subprocess.run([sys.executable, "-m", "launch.audit", f"--workdir={workdir}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  lines = out.stdout.strip().splitlines()
  assert lines[-1].startswith("audit: OK"), out.stdout + out.stderr
  for r in (1, 2, 3):  # each block lists the three registered sites, signed and accepted
    line = next(l for l in lines if l.startswith(f"round {r:3d} |"))
    assert all(f"{name}=" in line for name in dirs), line
  rows = _rows(workdir)
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert all(r["wire"]["up_bytes"] > 0 for r in rows)
  assert (workdir / "adapter" / "adapter_model.safetensors").exists()


def test_a_supernode_killed_during_the_run_is_absent_and_the_run_completes(tmp_path, data):
  config = _config("dual_lora", **{"run.rounds": 3})
  workdir = tmp_path / "flower"
  dirs = layout.lay_out(config, workdir, QUIET, data=data, timeouts=FAST)
  victim = list(dirs)[-1]
  with harness.LocalDeployment(str(workdir), {n: str(d) for n, d in dirs.items()},
                               resident_workers=True, log=QUIET, env=ENV) as deployment:
    def kill_after_round_one():
      while not _rows(workdir):
        time.sleep(0.2)
      deployment.kill_site(victim)  # SIGKILL: a crash, not a sign-off
    killer = threading.Thread(target=kill_after_round_one, daemon=True)
    killer.start()
    deployment.run(timeout=900)
    killer.join(timeout=60)
    tag = deployment.tag
  assert harness.tagged_processes(tag) == []
  blocks = _blocks(workdir)
  assert [b["round"] for b in blocks[1:]] == [1, 2, 3]
  later = [{e["site"]: e["status"] for e in b["entries"]} for b in blocks[2:]]
  assert all(s[victim] == "absent" for s in later[1:])  # round 2 may have finished in time
  assert all(list(s.values()).count("accepted") >= 2 for s in later)
  assert audit.audit_workdir(workdir).ok


def test_a_coordinator_killed_mid_run_resumes_and_ends_with_the_uninterrupted_adapter(
    tmp_path, data, reference):
  config = _config("fedavg", **{"run.rounds": 3})
  workdir = tmp_path / "flower"
  dirs = layout.lay_out(config, workdir, QUIET, data=data, timeouts=FAST)
  with harness.LocalDeployment(str(workdir), {n: str(d) for n, d in dirs.items()},
                               resident_workers=True, log=QUIET, env=ENV) as deployment:
    killed = {}

    def kill_after_round_two():  # round 1's checkpoint is complete by then
      while len(_rows(workdir)) < 2:
        time.sleep(0.2)
      killed["ok"] = deployment.kill_coordinator()
    killer = threading.Thread(target=kill_after_round_two, daemon=True)
    killer.start()
    with pytest.raises(Exception):  # the ServerApp died: no status, or a failed one
      deployment.run(timeout=900)
    killer.join(timeout=60)
    assert killed.get("ok")
    assert len(_rows(workdir)) == 2
    deployment.run(timeout=900)  # a new ServerApp on the same SuperLink and SuperNodes
    tag = deployment.tag
  logs = "".join(p.read_text(errors="replace") for p in (workdir / "logs").glob("*"))
  assert "coordinator resumed from round" in logs
  assert harness.tagged_processes(tag) == []
  assert [r["round"] for r in _rows(workdir)] == [1, 2, 3]
  _assert_equal_trees(_final_global(workdir), reference)
  assert audit.audit_workdir(workdir).ok
