"""A round run as its two roles called separately (each site on its own, then the server,
then each site from the server's decision) equals the compiled round: the contract a
deployment with one process per site relies on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora import rounds
from tests.test_federation import _assert_trees_close, build, data  # noqa: F401 (fixture)


def _one(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "fedsa_lora", "dual_lora",
                                       "fedmedlora_plus"])
def test_site_and_server_parts_called_apart_give_the_compiled_rounds_adapter(data, algorithm):
  # One site at a time in the compiled round too (lax.map), as each site runs alone here:
  # SCAFFOLD's control correction carries vmap-against-single-site rounding to ~1e-5.
  fed = build(data, algorithm=algorithm, mode="sequential")
  state = jax.tree.map(np.asarray, fed.state)
  idx, present, batches, step_mask, keys, rank = fed.round_inputs(1)
  spec = fed.spec

  # Each site, on its own: the global adapter and the server's broadcast state in, its
  # upload out (jitted one site at a time, never stacked with another site).
  site_fn = jax.jit(functools.partial(rounds.site_update, spec, fed.graphdef))
  outs, owns = [], []
  for i, k in enumerate(idx):
    own = _one(state["sites"], int(k))
    out, _ = site_fn(fed.base, state["global"], state["server"], own, _one(batches, i),
                     step_mask[i], keys[i], None if rank is None else rank[i])
    outs.append(out)
    owns.append(own)

  # The server: only the uploads (no site state), then its decision.
  validated = fed.algorithm.needs_validation
  uploads = _stack([{"global": o["trained"]["global"],
                     "local": o["trained"].get("local") if validated else None,
                     "control_delta": o["control_delta"]} for o in outs])
  num_sites = len(fed.sites) if jax.tree.leaves(state["sites"]) else len(idx)
  server_fn = jax.jit(functools.partial(rounds.server_aggregate, spec, fed.aggregator,
                                        fed.graphdef, num_sites=num_sites))
  core = {"global": state["global"], "server": state["server"]}
  new_core, accepted, _ = server_fn(fed.base, core, uploads, jnp.asarray(present),
                                    jnp.asarray(fed.token_counts[idx]), fed.val)
  # Each site again: its own state from the server's decision.
  kept = [rounds.site_accept(spec, own, out, accepted[i])
          for i, (own, out) in enumerate(zip(owns, outs))]

  fed.step()  # the same round as one compiled program
  # The tolerance the simulator's own mode-agreement test uses (float32 rounding only).
  _assert_trees_close(jax.tree.map(np.asarray, new_core["global"]),
                      jax.tree.map(np.asarray, fed.state["global"]))
  for i, k in enumerate(idx):
    _assert_trees_close(jax.tree.map(np.asarray, kept[i]),
                        jax.tree.map(np.asarray, _one(fed.state["sites"], int(k))))
  assert bool(np.all(np.asarray(accepted) == np.asarray(present)))
