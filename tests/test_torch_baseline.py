"""The PyTorch baseline (transformers + peft, sequential clients) does the same work as the
JAX simulator: from the same adapter, data order and weights, one round lands on the same
global adapter and training losses."""

import jax
import numpy as np
import pytest

from fedjax_lora import experiment, mesh as mesh_lib
from fedjax_lora.data import prepare
from tests.test_federation import QUIET, small_config

torch = pytest.importorskip("torch", reason="the baseline needs the [torch] extra")
pytest.importorskip("peft", reason="the baseline needs the [torch] extra")
from fedjax_lora import torch_baseline  # noqa: E402  (after the importorskip)
from fedjax_lora.client import ClientConfig  # noqa: E402


def test_lr_factor_matches_the_jax_schedule():
  from fedjax_lora.client import learning_rate
  import jax.numpy as jnp
  cfg = ClientConfig(learning_rate=1.0, warmup_fraction=0.2)
  for total in (1, 3, 10):
    for step in range(total):
      want = float(learning_rate(cfg, jnp.int32(step), jnp.int32(total)))
      assert torch_baseline.lr_factor(cfg, step, total) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("accumulation, weight_decay, grad_clip", [
    (1, 0.0, 1.0),
    (2, 0.0, 1.0),
    (1, 0.1, 1e-3),   # decoupled weight decay, and a clip that binds at every step
])
def test_one_round_matches_the_jax_simulator(tmp_path, hf_llama, accumulation, weight_decay,
                                             grad_clip):
  # A 2-layer checkpoint saved by transformers; the vocabulary covers the synthetic BPE tokenizer.
  model_dir, _ = hf_llama(vocab_size=1024, hidden_size=32, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2)
  config = small_config(**{"model.path": str(model_dir), "run.accumulation": accumulation,
                           "run.epochs": 2, "client.learning_rate": 3e-2,
                           "client.warmup_fraction": 0.3,
                           "client.weight_decay": weight_decay, "client.grad_clip": grad_clip})
  data = prepare.prepare(config.data, None, log=QUIET)
  fed = experiment.build(config, None, log=QUIET, mesh=mesh_lib.make_mesh(1, 1), data=data)
  start = jax.tree.map(np.asarray, fed.state["global"])
  idx, present, batches, step_mask, _, _ = fed.round_inputs(1)
  assert present.all() and step_mask.sum(1).min() < step_mask.shape[1]  # ragged clients
  row = fed.step()
  jax_global = jax.tree.map(np.asarray, fed.state["global"])

  baseline = torch_baseline.TorchFederation(model_dir, fed.spec.global_spec, fed.spec.client)
  clients = [(jax.tree.map(lambda x: x[k], batches), step_mask[k]) for k in range(len(idx))]
  torch_global, metrics = baseline.run_round(start, clients, fed.token_counts[idx])

  moved = max(float(np.abs(jax_global[t]["b"]).max()) for t in jax_global)
  assert moved > 1e-3  # B starts at zero: the round really trained
  for t in jax_global:
    for f in ("a", "b"):
      np.testing.assert_allclose(torch_global[t][f], jax_global[t][f], atol=2e-5, rtol=1e-3,
                                 err_msg=f"{t}.{f}")
  torch_losses = [m["train_loss"] for m in metrics]
  names = [fed.sites[k].name for k in idx]
  np.testing.assert_allclose(torch_losses, [row["train_loss"][n] for n in names], rtol=1e-4)


def test_baseline_rejects_what_it_does_not_implement(hf_llama):
  model_dir, _ = hf_llama()
  from models.lora import LoraSpec
  with pytest.raises(ValueError, match="plain FedAvg"):
    torch_baseline.TorchFederation(model_dir, LoraSpec(rank=2),
                                   ClientConfig(train_factors=("b",)))
  with pytest.raises(ValueError, match="without LoRA dropout"):
    torch_baseline.TorchFederation(model_dir, LoraSpec(rank=2, dropout=0.1), ClientConfig())
