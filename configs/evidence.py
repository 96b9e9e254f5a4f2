r"""The papers' claims tested on the five real sites with the real base, in one command.

  python -m launch.evaluate --config=configs/evidence.py --workdir=DIR

SmolLM2-135M-Instruct (the named base, Q4_1 GGUF dequantized to float32), LoRA r=16 on
all seven projections, the base's chat template, NER on one sentence per example. Sites
(data.md §4): PHEE, Chia, DDI and BioRED train; E3C-en is the low-resource new site (held
out of federated training); NCBI-disease is the external site (never trained on). The
whole matrix (issue "Evidence"; eval/claims.py): zero-shot; FedAvg (Fed-MedLoRA),
Fed-MedLoRA+ and Med-DualLoRA; FedAvg and Fed-MedLoRA+ with one label-flipping site;
Fed-MedLoRA+'s server validation set of 1, 5, 10 and 20 records per site (with that site);
each site alone; all sites pooled; the new site from the federated adapter or from scratch
at k = 0, 10, 50 and all examples. The run is resumable: rerun the command with the same
workdir after a stop and finished settings are skipped.

The caps below (`CPU`) make the matrix fit 1.5–3 hours on 2 CPU cores; each is named,
and `--config=configs/evidence.py:full` lifts them: every training example, whole test
splits, the paper's 3 rounds of 2 epochs (the full-scale run, for an accelerator). Every
field can be overridden on the command line. Fed-MedLoRA+ uses 5 server validation
records per training site (from its dev split) unless val_size says otherwise.
"""

import ml_collections

from configs import benchmark, data_five_sites, federate

# CPU-sized slices, one place. Measured on 2 AVX2 cores (WORKSPACE.md "Evidence"): a
# training example costs about 2 s (prompt + sentence + tagged sentence pad to 384
# tokens), a scored test example about 1.6 s (prefill plus greedy decoding of its answer),
# so these sizes made the matrix 1 h 26 min (about 3 times that on the slower machine of
# the first, partial run). 16 test examples fill one decoding batch.
CPU = dict(
    train_examples=12,        # per training site (0: all)
    new_site_examples=60,     # E3C-en training examples: k = "all" (0: all 680)
    test_examples=16,         # per site and task (0: whole test splits)
    rounds=2, epochs=1, adapt_rounds=1,
)
FULL = dict(train_examples=0, new_site_examples=0, test_examples=0, rounds=3, epochs=2,
            adapt_rounds=0)


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  if scale not in ("cpu", "full"):
    raise ValueError(f"unknown evidence scale {scale!r}; expected 'cpu' or 'full'")
  sizes = CPU if scale == "cpu" else FULL
  c = federate.get_config("smollm2")      # base, chat template, completion loss, LoRA, lr
  c.data = data_five_sites.get_config()
  c.data.prompt_format, c.data.loss = "chat", "completion"
  # Chia's prompt (11 types with glosses) takes 271 tokens in the chat template: 384 fits
  # prompt + sentence + tagged sentence (windows keep the rest; truncations are counted).
  c.data.max_length = 384
  c.data.sites.e3c.role = "new_site"
  for name, site in c.data.sites.items():
    site.tasks = ("ner",)
    site.unit, site.pack = "sentence", False
    site.labels.entity_definitions = ()
    site.max_train_examples = (sizes["new_site_examples"] if name == "e3c"
                               else sizes["train_examples"])
  c.security.ledger = False               # the ledger is tested elsewhere; not a claim here
  # Batch 1: the most updates for the tokens we can afford. A probe with 4 steps of batch 2
  # per site left the model copying the input without tags (F1 ~0); the synthetic main
  # job began to tag after about 24 steps per site.
  c.run.update(rounds=sizes["rounds"], epochs=sizes["epochs"], batch_size=1,
               val_examples_per_site=5, val_chunk=5)
  c.eval.update(
      settings=("zero_shot", "federated", "faulty", "val_size", "single_site", "centralized",
                "new_site"),
      algorithms=("fedavg", "fedmedlora_plus", "dual_lora"),
      fault_sites="chia:label_flip", fault_algorithms=("fedavg", "fedmedlora_plus"),
      val_sizes=(1, 5, 10, 20),
      single_site_scope="all",             # every site: claim 6 compares on the others
      adapt_k=(0, 10, 50, -1), adapt_from="fedavg", adapt_rounds=sizes["adapt_rounds"],
      max_examples_per_task=sizes["test_examples"], round_examples_per_task=4,
      batch_size=16, max_new_tokens=192,
      comm_shapes=ml_collections.ConfigDict({"llama3_8b": benchmark.MODELS["llama3_8b"]}),
      comm_rank=16, comm_dtype_bytes=2, comm_paper_reduction=0.985,
  )
  return c
