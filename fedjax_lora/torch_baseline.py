"""Federated LoRA the way the PyTorch peers run it: transformers + peft, clients one after
another on one model copy, FedAvg of the adapters.

This is the reference our throughput is measured against, so it is meant to be a fair one:
SDPA attention, one model and one set of LoRA modules reused by every client (the global
adapter is copied in, never re-wrapped), no host round trips inside a client's steps, and
optionally `torch.compile`. It does the same work as `fedjax_lora.client.client_update`:
same batches and step masks, token-sum loss over a step's micro-batches divided by its
supervised tokens, global-norm clip, Adam(W) with the HF warmup + cosine schedule, a fresh
optimizer every round, token-count FedAvg of A and B separately.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedjax_lora.client import ClientConfig
from models.lora import LoraSpec

try:
  import peft
  import torch
  import transformers
except ImportError as e:  # torch is an optional extra
  raise ImportError("the PyTorch baseline needs the [torch] extra: "
                    "pip install torch==2.13.0 && pip install -e '.[torch]'") from e


def lr_factor(cfg: ClientConfig, step: int, total_steps: int) -> float:
  """The multiplier of `fedjax_lora.client.learning_rate` (HF linear warmup, then cosine)."""
  if cfg.schedule == "constant":
    return 1.0
  total = max(total_steps, 1)
  warmup = math.ceil(cfg.warmup_fraction * total)
  if step < warmup:
    return step / max(warmup, 1)
  progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
  return 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchFederation:
  """One `PeftModel` over a Hugging Face LLaMA directory; `run_round` trains clients in turn."""

  def __init__(self, model_dir: str | Path, spec: LoraSpec, client: ClientConfig, *,
               compile: bool = False, device: str = "cpu", dtype: str = "float32",
               attn_implementation: str = "sdpa"):
    if set(client.train_factors) != {"a", "b"} or client.prox_mu or client.scaffold:
      raise ValueError("the PyTorch baseline implements plain FedAvg clients only")
    if spec.dropout:
      raise ValueError("the JAX client trains without LoRA dropout; so does its baseline "
                       f"(got dropout={spec.dropout})")
    self.spec, self.client, self.device = spec, client, torch.device(device)
    base = transformers.LlamaForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    lora_config = peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.targets), use_rslora=spec.use_rslora, bias="none",
        layers_to_transform=None if spec.layers is None else list(spec.layers),
        task_type="CAUSAL_LM")
    self.model = peft.get_peft_model(base, lora_config).to(self.device)
    # LoRA factors are stored float32 like ours (peft's autocast_adapter_dtype default).
    # With a bf16 base peft also computes the LoRA path in float32, where the JAX side
    # computes it in bf16: a little more work for the baseline in bf16 runs.
    self.model.train()
    self.num_layers = base.config.num_hidden_layers
    self.vocab_size = base.config.vocab_size
    self._factors = self._lora_parameters()
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.forward = torch.compile(self.model, dynamic=False) if compile else self.model

  def _lora_parameters(self) -> dict[tuple[str, int, str], "torch.nn.Parameter"]:
    out = {}
    for name, p in self.model.named_parameters():
      if "lora_" not in name:
        continue
      parts = name.split(".")
      layer = int(parts[parts.index("layers") + 1])
      target = next(t for t in self.spec.targets if t in parts)
      out[(target, layer, "a" if "lora_A" in parts else "b")] = p
    return out

  # ---- adapters in our layout ([n, in, r] / [n, r, out], numpy) ---------------------------
  def set_adapter(self, params: dict) -> None:
    layers = self.spec.layer_indices(self.num_layers)
    with torch.no_grad():
      for target, ab in params.items():
        for slot, layer in enumerate(layers):
          for f, which in (("a", ab["a"]), ("b", ab["b"])):
            self._factors[(target, layer, f)].copy_(torch.tensor(np.asarray(which[slot]).T))

  def adapter_tensors(self) -> dict:
    """Current factors as torch tensors in our layout (a copy, on the model's device)."""
    layers = self.spec.layer_indices(self.num_layers)
    return {t: {f: torch.stack([self._factors[(t, l, f)].detach().T for l in layers]).clone()
                for f in ("a", "b")} for t in self.spec.targets}

  # ---- training --------------------------------------------------------------------------
  def _loss_sum(self, micro: dict) -> "torch.Tensor":
    logits = self.forward(input_ids=micro["tokens"], attention_mask=micro["attention_mask"],
                          use_cache=False).logits
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        micro["tokens"][:, 1:].reshape(-1), reduction="none")
    return (per_token * micro["loss_mask"][:, 1:].reshape(-1)).sum()

  def train_client(self, batches: dict, step_mask) -> dict:
    """Local training from the adapter now in the model. batches: numpy [S, A, B, L]."""
    cfg = self.client
    opt = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2),
                            eps=cfg.eps, weight_decay=cfg.weight_decay)
    total = int(np.sum(step_mask))
    if not np.all(np.asarray(step_mask)[:total]):
      raise ValueError("masked (padding) steps must come after a client's real steps")
    tensors = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batches.items()}
    tensors["tokens"] = tensors["tokens"].long()
    tensors["attention_mask"] = tensors["attention_mask"].long()
    tensors["loss_mask"] = tensors["loss_mask"].float()
    loss_sum, token_sum = 0.0, 0.0
    for i in range(total):  # the masked steps at the end are skipped, not run
      count = tensors["loss_mask"][i][:, :, 1:].sum()
      denom = torch.clamp(count, min=1.0)
      step_loss = 0.0
      for a in range(tensors["tokens"].shape[1]):
        micro = {k: v[i, a] for k, v in tensors.items()}
        loss = self._loss_sum(micro)
        (loss / denom).backward()
        step_loss = step_loss + loss.detach()
      if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
      for group in opt.param_groups:
        group["lr"] = cfg.learning_rate * lr_factor(cfg, i, total)
      opt.step()
      opt.zero_grad(set_to_none=True)
      loss_sum = loss_sum + step_loss
      token_sum = token_sum + count
    tokens = float(token_sum)
    return {"train_loss": float(loss_sum) / max(tokens, 1.0), "train_tokens": tokens,
            "steps": total}

  def run_round(self, global_params: dict, client_batches: list[tuple[dict, np.ndarray]],
                token_counts) -> tuple[dict, list[dict]]:
    """Trains each client from `global_params`, then FedAvg (weights ∝ token counts)."""
    weights = np.asarray(token_counts, np.float64)
    weights = weights / weights.sum()
    total = None
    metrics = []
    for (batches, mask), w in zip(client_batches, weights):
      self.set_adapter(global_params)
      metrics.append(self.train_client(batches, mask))
      trained = self.adapter_tensors()
      scaled = {t: {f: float(w) * v for f, v in ab.items()} for t, ab in trained.items()}
      total = scaled if total is None else {
          t: {f: total[t][f] + scaled[t][f] for f in ab} for t, ab in scaled.items()}
    new_global = {t: {f: v.float().cpu().numpy() for f, v in ab.items()}
                  for t, ab in total.items()}
    return new_global, metrics

