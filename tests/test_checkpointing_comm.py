"""Round checkpoints (bit-exact round trip, retention, metrics, errors) and traffic accounting."""

from __future__ import annotations

import math
import os
import typing

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fedjax_lora import comm
from fedjax_lora.checkpointing import RoundCheckpointer


class Pair(typing.NamedTuple):
  x: jax.Array
  key: jax.Array


def _state(seed: int = 0) -> dict:
  """Nested state with awkward values: NaN, -0, inf, subnormals, int extremes, typed keys."""
  rng = np.random.default_rng(seed)
  f32 = rng.standard_normal((3, 4)).astype(np.float32)
  f32.flat[:4] = [np.nan, -0.0, np.inf, np.float32(1e-45)]
  bf16 = rng.integers(0, 2**16, size=(2, 5), dtype=np.uint16).view(ml_dtypes.bfloat16)
  i32 = np.array([np.iinfo(np.int32).min, -1, 0, np.iinfo(np.int32).max, seed], np.int32)
  return {
      "global": {"q_proj": {"a": jnp.asarray(f32), "b": jnp.asarray(bf16)}},
      "server": {"count": jnp.asarray(i32), "host": np.array(f32[::-1])},
      "sites": {"pair": Pair(jnp.asarray(f32[:, :2]), jax.random.key(seed + 7)),
                "keys": jax.random.split(jax.random.key(seed, impl="rbg"), 3)},
      "empty": {},
      "round": jnp.int32(seed),
  }


def _bits(tree) -> list[tuple[str, np.ndarray]]:
  """Every leaf as (path, raw bytes); typed keys as (impl, key data)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      out.append((name + str(jax.random.key_impl(x)), np.array(jax.random.key_data(x))))
    else:
      arr = np.atleast_1d(np.array(x))
      out.append((name + arr.dtype.name + str(np.shape(x)), arr.view(np.uint8).copy()))
  return out


def _assert_same_bits(a, b):
  ba, bb = _bits(a), _bits(b)
  assert [n for n, _ in ba] == [n for n, _ in bb]
  for (name, x), (_, y) in zip(ba, bb):
    np.testing.assert_array_equal(x, y, err_msg=name)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


# ---- checkpoints --------------------------------------------------------------------------------

def test_round_trip_is_bit_exact_and_durable(tmp_path):
  state = _state(1)
  expected = _bits(state)
  ck = RoundCheckpointer(tmp_path / "ck")
  ck.save(1, state, {"loss": 0.5})
  # The caller may donate/overwrite its buffers right after save: the save must not depend on them.
  state["global"]["q_proj"]["a"].delete()
  state["server"]["host"][:] = 0
  ck.wait()
  ck.close()

  fresh = RoundCheckpointer(tmp_path / "ck")  # reads from disk only
  for target in (_state(2), _abstract(_state(2))):  # concrete and abstract targets
    restored, metrics = fresh.restore(1, target=target)
    assert [n for n, _ in _bits(restored)] == [n for n, _ in expected]
    for (name, x), (_, y) in zip(_bits(restored), expected):
      np.testing.assert_array_equal(x, y, err_msg=name)
    assert isinstance(restored["sites"]["pair"], Pair)
    assert isinstance(restored["server"]["host"], np.ndarray)
    assert restored["empty"] == {}
    assert metrics == {"loss": 0.5}
  # A restored key is a working key: it draws the same numbers as the original.
  restored, _ = fresh.restore(1, target=_state(2))
  np.testing.assert_array_equal(jax.random.normal(restored["sites"]["pair"].key, (4,)),
                                jax.random.normal(jax.random.key(1 + 7), (4,)))


def test_restore_without_target_rewraps_keys(tmp_path):
  state = _state(3)
  with RoundCheckpointer(tmp_path) as ck:
    ck.save(4, state, {})
    ck.wait()
    restored, _ = ck.restore()
  assert jax.random.key_impl(restored["sites"]["keys"]) == jax.random.key_impl(
      state["sites"]["keys"])
  np.testing.assert_array_equal(jax.random.key_data(restored["sites"]["keys"]),
                                jax.random.key_data(state["sites"]["keys"]))
  np.testing.assert_array_equal(np.asarray(restored["global"]["q_proj"]["b"]).view(np.uint16),
                                np.asarray(state["global"]["q_proj"]["b"]).view(np.uint16))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_retention_keeps_last_n_and_best(tmp_path, mode):
  # None: the round reported no val_loss; NaN never counts as best.
  values = [5.0, 1.0, 7.0, None, 3.0, float("nan"), 9.0, 4.0, 6.0]
  keep_last = 3
  ck = RoundCheckpointer(tmp_path, keep_last=keep_last, best_metric="val_loss", best_mode=mode)
  small = {"x": jnp.zeros(2)}
  for r, v in enumerate(values, start=1):
    ck.save(r, small, {} if v is None else {"val_loss": v, "other": -r})
  ck.wait()
  scored = {r: v for r, v in enumerate(values, 1) if v is not None and math.isfinite(v)}
  best = (min if mode == "min" else max)(scored, key=scored.get)
  expected = sorted(set(range(len(values) - keep_last + 1, len(values) + 1)) | {best})
  assert best == (2 if mode == "min" else 7)
  assert ck.all_rounds() == expected
  assert ck.best_round() == best
  on_disk = sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit())
  assert on_disk == expected
  ck.close()
  again = RoundCheckpointer(tmp_path, keep_last=keep_last, best_metric="val_loss", best_mode=mode)
  assert again.all_rounds() == expected and again.best_round() == best


def test_retention_without_best_metric(tmp_path):
  ck = RoundCheckpointer(tmp_path, keep_last=2)
  for r in range(5):
    ck.save(r, {"x": jnp.full(3, r)}, {"val_loss": -r})
  ck.wait()
  assert ck.all_rounds() == [3, 4] and ck.latest_round() == 4 and ck.best_round() is None


def test_metrics_json_round_trip_and_restore_latest(tmp_path):
  ck = RoundCheckpointer(tmp_path, keep_last=5)
  rows = []
  for r in (1, 2, 3):
    row = {"round": r, "clients": ["a", "b"], "present": [True, r % 2 == 0],
           "weights": {"a": 0.25 * r, "b": 1 - 0.25 * r}, "comm": {"total_up_bytes": 10**12 + r},
           "note": "ok", "nan": float("nan"), "np_scalar": np.float32(0.5), "arr": np.arange(2)}
    rows.append(row)
    ck.save(r, {"global": jnp.full((2,), float(r))}, row)
  ck.wait()
  state, metrics = ck.restore()  # latest
  np.testing.assert_array_equal(state["global"], np.full((2,), 3.0))
  want = {**rows[-1], "np_scalar": 0.5, "arr": [0, 1]}
  assert math.isnan(metrics.pop("nan")) and math.isnan(want.pop("nan"))
  assert metrics == want
  state, metrics = ck.restore(2)
  np.testing.assert_array_equal(state["global"], np.full((2,), 2.0))
  assert metrics["weights"] == {"a": 0.5, "b": 0.5}
  with pytest.raises(ValueError, match="metrics must be JSON"):
    ck.save(4, {"x": jnp.zeros(1)}, {"bad": object()})


def test_errors_name_directory_and_round(tmp_path):
  empty = RoundCheckpointer(tmp_path / "empty")
  assert empty.latest_round() is None and empty.all_rounds() == []
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*empty"):
    empty.restore()
  ck = RoundCheckpointer(tmp_path / "run")
  ck.save(2, {"x": jnp.zeros(2)}, {})
  ck.wait()
  with pytest.raises(FileNotFoundError, match=r"round 7 not found in .*run.*\[2\]"):
    ck.restore(7)
  with pytest.raises(ValueError, match="round 2 is not after"):
    ck.save(2, {"x": jnp.zeros(2)}, {})
  with pytest.raises(ValueError, match=r"x: stored float32\[2\], target float32\[3\]"):
    ck.restore(target={"x": jnp.zeros(3)})
  with pytest.raises(ValueError, match="y not in checkpoint"):
    ck.restore(target={"x": jnp.zeros(2), "y": jnp.zeros(1)})
  ck.save(3, {"k": jnp.zeros(2, jnp.uint32)}, {})  # plain uint32 data, not a key
  ck.wait()
  with pytest.raises(ValueError, match="PRNG keys at"):
    ck.restore(3, target={"k": jax.random.key(0)})
  for kwargs, name in (({"keep_last": 0}, "keep_last"), ({"best_mode": "best"}, "best_mode"),
                       ({"best_metric": ""}, "best_metric")):
    with pytest.raises(ValueError, match=name):
      RoundCheckpointer(tmp_path / "bad", **kwargs)


# ---- communication ------------------------------------------------------------------------------

LLAMA3_8B = dict(layers=32, hidden=4096, kv=1024, mlp=14336, vocab=128256)
LLAMA32_1B = dict(layers=16, hidden=2048, kv=512, mlp=8192, vocab=128256)


def _proj_dims(m) -> dict[str, tuple[int, int]]:
  h, kv, f = m["hidden"], m["kv"], m["mlp"]
  return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
          "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def _lora_shapes(m, rank=16, dtype=jnp.float32, lead=()) -> dict:
  n = m["layers"]
  return {t: {"a": jax.ShapeDtypeStruct(lead + (n, i, rank), dtype),
              "b": jax.ShapeDtypeStruct(lead + (n, rank, o), dtype)}
          for t, (i, o) in _proj_dims(m).items()}


def test_tree_bytes_by_dtype():
  tree = {"a": np.zeros((3, 4), np.float32), "b": jnp.zeros(5, jnp.bfloat16),
          "c": [np.zeros((2, 2), np.int32), jax.ShapeDtypeStruct((7,), jnp.float32)],
          "k": jax.random.key(0), "none": None}
  # 12*4 + 7*4 = 76 float32; 5*2 bfloat16; 4*4 int32; threefry key = 2 uint32 words.
  assert comm.tree_bytes(tree) == {"float32": 76, "bfloat16": 10, "int32": 16, "uint32": 8}
  assert comm.total_bytes(tree) == 110


def test_llama_lora_bytes_match_method_md():
  # method.md §8: 32 x 16 x [2(4096+4096) + 2(4096+1024) + 3(4096+14336)] = 41,943,040 params.
  adapter = _lora_shapes(LLAMA3_8B)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(adapter)) == 41_943_040
  assert comm.tree_bytes(adapter) == {"float32": 167_772_160}
  assert comm.total_bytes(_lora_shapes(LLAMA3_8B, dtype=jnp.bfloat16)) == 83_886_080  # "84 MB"
  # Llama-3.2-1B: 16 x 16 x [2*4096 + 2*2560 + 3*10240] = 11,272,192 params.
  assert comm.total_bytes(_lora_shapes(LLAMA32_1B)) == 4 * 11_272_192


def _base_shapes(m, dtype=jnp.bfloat16) -> dict:
  n, h, v = m["layers"], m["hidden"], m["vocab"]
  layers = {t: jax.ShapeDtypeStruct((n, i, o), dtype) for t, (i, o) in _proj_dims(m).items()}
  layers |= {"input_norm": jax.ShapeDtypeStruct((n, h), dtype),
             "post_norm": jax.ShapeDtypeStruct((n, h), dtype)}
  return {"embed": jax.ShapeDtypeStruct((v, h), dtype), "layers": layers,
          "norm": jax.ShapeDtypeStruct((h,), dtype), "lm_head": jax.ShapeDtypeStruct((h, v), dtype)}


def test_model_bytes_llama3_8b():
  # Per layer 2*4096^2 + 2*4096*1024 + 3*4096*14336 + 2*4096 = 218,112,000; x32 = 6,979,584,000;
  # + embed and head 2*128256*4096 = 1,050,673,152; + final norm 4096 -> 8,030,261,248 params.
  assert comm.model_bytes(_base_shapes(LLAMA3_8B)) == 2 * 8_030_261_248


def test_round_comm_counts_present_clients_only():
  k = 4
  present = np.array([True, False, True, True])
  m = dict(layers=2, hidden=8, kv=4, mlp=16)
  full_adapter = _lora_shapes(m, rank=2)
  # FFA-LoRA style: only B goes up (stacked on K); the whole adapter comes down.
  uplink = {t: {"b": ab["b"]} for t, ab in _lora_shapes(m, rank=2, lead=(k,)).items()}
  # B bytes per client: 2 layers * 2 rank * (8+8+4+4+16+16+8 = 64 out) * 4 = 1024.
  # A bytes per client: 2 * 2 * (8*6 + 16) * 4 = 1024. Downlink = A + B = 2048.
  up_client, down_client = 1024, 2048
  full = 10_000
  out = comm.round_comm(uplink, full_adapter, present, full)
  assert out["up_bytes"] == [up_client, 0, up_client, up_client]
  assert out["down_bytes"] == [down_client, 0, down_client, down_client]
  assert out["total_up_bytes"] == 3 * up_client and out["total_down_bytes"] == 3 * down_client
  assert out["total_bytes"] == 3 * (up_client + down_client)
  assert out["up_bytes_by_dtype"] == {"float32": 3 * up_client}
  assert out["full_model_up_bytes"] == out["full_model_down_bytes"] == 3 * full
  assert out["reduction"] == pytest.approx(1 - (up_client + down_client) / (2 * full))
  assert out["up_reduction"] == pytest.approx(1 - up_client / full)
  # SCAFFOLD doubles the uplink only.
  scaffold = comm.round_comm(uplink, full_adapter, present, full, uplink_multiplier=2)
  assert scaffold["total_up_bytes"] == 6 * up_client
  assert scaffold["total_down_bytes"] == 3 * down_client
  # Concrete arrays give the same counts as shapes.
  concrete = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), uplink)
  assert comm.round_comm(concrete, full_adapter, present, full) == out
  none = comm.round_comm(uplink, full_adapter, np.zeros(k, bool), full)
  assert none["total_bytes"] == 0 and none["reduction"] is None


def test_round_comm_per_client_lists_and_errors():
  present = np.array([True, True, False])
  ranks = [1, 2, 4]  # heterogeneous ranks: one tree per client
  ups = [{"a": np.zeros((3, r), np.float32), "b": np.zeros((r, 5), ml_dtypes.bfloat16)}
         for r in ranks]
  down = {"a": np.zeros((3, 4), np.float32)}
  out = comm.round_comm(ups, down, present, 1000)
  assert out["up_bytes"] == [3 * 1 * 4 + 1 * 5 * 2, 3 * 2 * 4 + 2 * 5 * 2, 0]
  assert out["up_bytes_by_dtype"] == {"float32": 12 + 24, "bfloat16": 10 + 20}
  assert out["down_bytes"] == [48, 48, 0]
  with pytest.raises(ValueError, match="leading client axis"):
    comm.round_comm({"a": np.zeros((2, 3))}, down, present, 1000)
  with pytest.raises(ValueError, match="per-client trees"):
    comm.round_comm(ups[:2], down, present, 1000)
  with pytest.raises(ValueError, match="uplink_multiplier"):
    comm.round_comm(ups, down, present, 1000, uplink_multiplier=0)
  with pytest.raises(ValueError, match="present"):
    comm.round_comm(ups, down, np.array([1, 1, 0]), 1000)
  with pytest.raises(ValueError, match="full_model_bytes"):
    comm.round_comm(ups, down, present, -1)
