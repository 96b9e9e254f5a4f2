"""The simulator: execution modes agree, masked steps are no-ops, resume is exact, every
algorithm runs by name with its defining behaviour, bad configs fail before training."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.federate as federate_config
from fedjax_lora import client_modes, experiment, mesh as mesh_lib, rounds
from fedjax_lora.algorithms import ALGORITHMS
from fedjax_lora.client import client_update
from fedjax_lora.data import prepare
from fedjax_lora.errors import ConfigError
from models import quant

REPO = Path(__file__).resolve().parent.parent
QUIET = lambda s: None


def small_config(**overrides):
  c = federate_config.get_config("tiny")
  for name, cap in zip(sorted(c.data.sites), (6, 4, 2)):  # 3, 2 and 1 steps: ragged clients
    c.data.sites[name].max_train_examples = cap
  c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                 num_kv_heads=2)
  c.lora.rank = 4
  c.lora.alpha = 16.0
  c.lora.local_rank = 2
  c.run.update(rounds=2, batch_size=2, val_examples_per_site=2, val_chunk=2)
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c


@pytest.fixture(scope="module")
def data():
  return prepare.prepare(small_config().data, None, log=QUIET)


def build(data, mesh=None, workdir=None, **overrides):
  if mesh is None:
    mesh = mesh_lib.make_mesh(1, 1)
  return experiment.build(small_config(**overrides), workdir, log=QUIET, mesh=mesh, data=data)


def _global(fed):
  return jax.tree.map(np.asarray, fed.state["global"])


def _assert_trees_close(a, b, atol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


def test_vmap_sequential_sharded_and_python_loop_agree(data):
  runs = {}
  for name, kwargs in {"vmap": {}, "sequential": {"mode": "sequential"}}.items():
    fed = build(data, **kwargs)
    fed.step()
    runs[name] = _global(fed)
  sharded = build(data, mesh=mesh_lib.make_mesh(3, 2))  # 3 client shards x 2 fsdp shards
  sharded.step()
  runs["sharded"] = _global(sharded)
  _assert_trees_close(runs["vmap"], runs["sequential"])
  _assert_trees_close(runs["vmap"], runs["sharded"])

  # An explicit per-client Python loop with the same inputs, then FedAvg by token counts.
  fed = build(data)
  start = _global(fed)
  idx, present, batches, step_mask, keys, _ = fed.round_inputs(1)
  update = jax.jit(lambda t, b, m, k: client_update(
      fed.graphdef, fed.base, t, {"global": fed.spec.global_spec}, b, m, k, fed.spec.client)[0])
  ys = [update({"global": start}, jax.tree.map(lambda x: x[k], batches), step_mask[k], keys[k])
        for k in range(len(idx))]
  w = fed.token_counts[idx] / fed.token_counts[idx].sum()
  expected = jax.tree.map(lambda *xs: sum(wk * np.asarray(x) for wk, x in zip(w, xs)),
                          *[y["global"] for y in ys])
  _assert_trees_close(runs["vmap"], expected)
  assert not np.allclose(jax.tree.leaves(start)[1], jax.tree.leaves(expected)[1])


@pytest.mark.parametrize("chunk", [2, 3, 4])
def test_chunked_clients_equal_vmap_and_sequential(data, chunk):
  # Six clients (the three sites twice): chunks of 2 and 3 divide them; 4 falls back to 3.
  fed = build(data)
  idx, _, batches, step_mask, keys, _ = fed.round_inputs(1)
  twice = lambda x: np.concatenate([np.asarray(x)] * 2)
  idx6, batches6 = twice(idx), jax.tree.map(twice, batches)
  mask6, keys6 = twice(step_mask), jax.random.split(jax.random.key(3), 6)
  state = {"global": fed.state["global"], "server": fed.state["server"]}
  out = {}
  for mode, n in (("vmap", 0), ("sequential", 0), ("chunked", chunk)):
    spec = dataclasses.replace(fed.spec, mode=mode, chunk=n)
    run = jax.jit(functools.partial(rounds.train_clients, spec, fed.graphdef))
    trained, _ = run(fed.base, state, fed.state["sites"], batches6, mask6, idx6, keys6)
    out[mode] = jax.tree.map(np.asarray, trained["trained"]["global"])
  _assert_trees_close(out["vmap"], out["sequential"])
  _assert_trees_close(out["vmap"], out["chunked"])
  assert client_modes.chunk_size(6, chunk) == {2: 2, 3: 3, 4: 3}[chunk]


def test_auto_client_mode_fits_the_memory_and_runs_one_client_at_a_time_on_cpu():
  from models.config import LlamaConfig
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64)
  per_client = client_modes.activation_bytes(cfg, 4, 512)
  assert 3 * 2**30 < per_client < 8 * 2**30   # the 135M base at [4, 512]: ~5.4 GiB

  class Device:
    def __init__(self, platform, free):
      self.platform, self.free = platform, free

    def memory_stats(self):
      return {"bytes_limit": self.free, "bytes_in_use": 0}
  room_for_3 = int(3.5 * per_client / client_modes.MEMORY_FRACTION)
  mode, _ = client_modes.choose("auto", 8, cfg, 4, 512, Device("gpu", room_for_3))
  assert (mode.mode, mode.chunk) == ("chunked", 2)        # 3 fit; 2 is the divisor of 8
  mode, _ = client_modes.choose("auto", 8, cfg, 4, 512, Device("gpu", 100 * per_client))
  assert mode.mode == "vmap"
  mode, _ = client_modes.choose("auto", 8, cfg, 4, 512, Device("gpu", per_client // 4))
  assert mode.mode == "sequential"                        # not even one fits: one at a time
  mode, why = client_modes.choose("auto", 8, cfg, 4, 512, Device("cpu", 100 * per_client))
  assert mode.mode == "sequential" and "CPU" in why
  with pytest.raises(ValueError, match="chunked:N"):
    client_modes.parse("chunked:0")


def test_masked_steps_leave_a_client_where_it_ends_alone(data):
  fed = build(data, **{"client.warmup_fraction": 0.0})  # every real step moves the weights
  _, _, batches, step_mask, keys, _ = fed.round_inputs(1)
  real_steps = step_mask.sum(1)
  k = int(np.flatnonzero((real_steps >= 2) & (real_steps < step_mask.shape[1]))[0])
  real = int(step_mask[k].sum())
  trainable = {"global": fed.state["global"]}
  run = lambda b, m: client_update(fed.graphdef, fed.base, trainable,
                                   {"global": fed.spec.global_spec}, b, m, keys[k],
                                   fed.spec.client)[0]
  padded = run(jax.tree.map(lambda x: x[k], batches), step_mask[k])
  alone = run(jax.tree.map(lambda x: x[k, :real], batches), step_mask[k, :real])
  _assert_trees_close(padded, alone, atol=1e-6)
  one_less = run(jax.tree.map(lambda x: x[k, :real - 1], batches), step_mask[k, :real - 1])
  assert not np.allclose(jax.tree.leaves(padded)[1], jax.tree.leaves(one_less)[1])


@pytest.mark.parametrize("algorithm,extra", [  # server state and per-site state both resume
    ("scaffold", {"run.availability": 0.6, "run.clients_per_round": 2}),
    ("dual_lora", {"run.availability": 0.6, "keep_optimizer_state": True}),
    ("fedavg", {"model.quantize": "nf4", "model.quant_block_size": 16}),  # QLoRA base
])
def test_resume_reaches_the_uninterrupted_state(data, tmp_path, algorithm, extra):
  kw = {"algorithm": algorithm, "run.rounds": 4, **extra}
  full = build(data, workdir=tmp_path / "full", **kw)
  assert quant.is_quantized(full.base) == ("model.quantize" in extra)
  full.run_rounds()
  part = build(data, workdir=tmp_path / "part", **kw)
  part.run_rounds(until=2)
  part.checkpointer.close()
  resumed = build(data, workdir=tmp_path / "part", **kw)
  assert resumed.resume() == 2
  resumed.run_rounds()
  want, got = full.checkpoint_state(), resumed.checkpoint_state()
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r["round"] for r in resumed.history] == [3, 4]
  rows = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_runs_by_name(data, algorithm):
  overrides = {"algorithm": algorithm}
  if ALGORITHMS[algorithm].hetero_ranks:
    overrides["lora.site_ranks"] = (4, 2, 1)
  fed = build(data, **overrides)
  start = _global(fed)
  row = fed.step()
  end = _global(fed)
  assert np.isfinite(row["mean_train_loss"]) and np.isfinite(row["val_loss"])
  a0, b0 = start["q_proj"]["a"], start["q_proj"]["b"]
  a1, b1 = end["q_proj"]["a"], end["q_proj"]["b"]
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(start))
  up_per_client = row["comm"]["up_bytes"][0]
  if algorithm == "ffa_lora":
    np.testing.assert_array_equal(a0, a1)  # A stays at the shared init
    assert not np.allclose(b0, b1) and up_per_client == adapter_bytes // 2
  elif algorithm == "fedsa_lora":
    np.testing.assert_array_equal(b0, b1)  # B never leaves the sites
    assert up_per_client == adapter_bytes // 2
    assert not np.allclose(fed.state["sites"]["personal"]["q_proj"]["b"], 0.0)
  elif algorithm == "dual_lora":
    assert up_per_client == adapter_bytes  # the local adapter is never sent
    assert not np.allclose(fed.state["sites"]["local"]["q_proj"]["b"], 0.0)
  elif algorithm == "scaffold":
    assert up_per_client == 2 * adapter_bytes
  elif algorithm == "flora":
    np.testing.assert_array_equal(b1, 0.0)  # a fresh LoRA each round...
    delta = fed.state["server"]["base_delta"]["q_proj"]
    assert np.abs(np.asarray(delta)).max() > 0  # ...after merging the products into the base
  elif algorithm == "fedmedlora_plus":
    losses = np.array(list(row["client_val_loss"].values()))
    weights = np.array(list(row["weights"].values()))
    np.testing.assert_allclose(weights, np.exp(-losses) / np.exp(-losses).sum(), rtol=1e-5)
  else:
    assert not np.allclose(b0, b1)
  if ALGORITHMS[algorithm].hetero_ranks:  # each client sends factors of its own rank
    ups = row["comm"]["up_bytes"]
    assert ups[0] == adapter_bytes and ups[1] == adapter_bytes // 2
    assert ups[2] == adapter_bytes // 4


@pytest.mark.parametrize("overrides,needle", [
    ({"algorithm": "fedmagic"}, "unknown algorithm 'fedmagic'"),
    ({"algorithm": "fedmedlora_plus", "run.val_examples_per_site": 0}, "val_examples_per_site"),
    ({"lora.site_ranks": (4, 2, 2)}, "site_ranks"),
    ({"run.clients_per_round": 5}, "clients_per_round=5"),
    ({"mode": "pmap"}, "config.mode"),
    ({"run.clients_per_round": -1}, "clients_per_round"),
    ({"run.keep_last": 0}, "keep_last"),
    ({"run.best_metric": "f1"}, "best_metric"),
    ({"algorithm": "flexlora", "lora.site_ranks": (2, 2, 1)}, "largest"),
])
def test_bad_config_fails_before_training(data, overrides, needle):
  with pytest.raises(ConfigError, match=needle):
    build(data, **overrides)


def test_sampling_and_availability_are_seeded(data):
  fed = build(data, **{"run.clients_per_round": 2, "run.availability": 0.5, "run.rounds": 3})
  fed.run_rounds()
  again = build(data, **{"run.clients_per_round": 2, "run.availability": 0.5, "run.rounds": 3})
  again.run_rounds()
  assert [(r["clients"], r["present"]) for r in fed.history] == \
      [(r["clients"], r["present"]) for r in again.history]
  assert all(len(r["clients"]) == 2 for r in fed.history)
  assert fed.round_fn._cache_size() == 1, "rounds must reuse one compiled program"
  for r in fed.history:  # absent clients get no weight and send nothing
    assert set(r["weights"]) == {c for c, p in zip(r["clients"], r["present"]) if p}


def test_launcher_losses_fall_and_adapter_is_exported(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  caps = [f"--config.data.sites.{s}.max_train_examples=12" for s in
          ("discharge_summary", "narrative_hospital", "telegraphic_clinic")]
  proc = subprocess.run(
      [sys.executable, "-m", "launch.federate", f"--workdir={tmp_path}",
       "--config=configs/federate.py:tiny", "--config.run.rounds=3", *caps], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("round ") >= 3
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r["mean_train_loss"] for r in rows]
  val = [r["val_loss"] for r in rows]
  assert train[0] > train[1] > train[2] and val[0] > val[1] > val[2]
  assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
  assert (tmp_path / "adapter" / "adapter_config.json").is_file()
  # The evaluation hook scored every site every round, and the plots were drawn.
  assert all(set(r["f1"]) == set(r["train_loss"]) for r in rows)
  assert all(set(r["val_loss_by_site"]) == set(r["train_loss"]) for r in rows)
  for name in ("f1_per_round", "val_loss_per_round", "weights_per_round", "cumulative_bytes"):
    assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
  again = subprocess.run(
      [sys.executable, "-m", "launch.federate", f"--workdir={tmp_path}",
       "--config=configs/federate.py:tiny"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and "--resume" in again.stderr


def test_client_axis_is_sharded_over_all_8_devices():
  c = small_config(**{"data.partition.kind": "iid", "data.partition.num_sites": 4})
  data4 = prepare.prepare(c.data, None, log=QUIET)
  mesh = mesh_lib.make_mesh(4, 2)
  assert mesh.devices.size == 8 == len(jax.devices())
  fed = experiment.build(c, None, log=QUIET, mesh=mesh, data=data4)
  idx, present, batches, step_mask, keys, _ = fed.round_inputs(1)
  placed = fed.place({"batches": batches}, True)
  assert placed["batches"]["tokens"].sharding.spec == jax.sharding.PartitionSpec("clients")
  fed.step()
  plain = experiment.build(c, None, log=QUIET, mesh=mesh_lib.make_mesh(1, 1), data=data4)
  plain.step()
  _assert_trees_close(_global(fed), _global(plain))
