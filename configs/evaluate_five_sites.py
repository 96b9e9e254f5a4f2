"""Evaluation settings on the real five-site plan of data.md §4 (needs ../shared).

PHEE, Chia, DDI and BioRED train; E3C-en is the low-resource new site (data.md §4.2);
NCBI-disease is the external-validation site. The model is the tiny random LLaMA with
the LLaMA-2 vocabulary unless `--config.model.path` names a real checkpoint (for the
paper's numbers: a Llama checkpoint with the LLaMA-2 tokenizer, r=16, alpha=64, lr 2e-4,
2 epochs, 3 rounds, `--config.eval.max_examples_per_task=0` for whole test splits).
The caps below keep a CPU run to minutes; raise them for real runs.

  python -m launch.evaluate --config=configs/evaluate_five_sites.py --workdir=DIR
"""

import ml_collections

from configs import data_five_sites, federate


def get_config() -> ml_collections.ConfigDict:
  c = federate.get_config("tiny")
  c.data = data_five_sites.get_config()
  c.data.sites.e3c.role = "new_site"
  for site in c.data.sites.values():
    site.max_train_examples = 24           # CPU-sized; 0 = every training example
  c.run.rounds = 2
  c.run.val_examples_per_site = 4
  c.run.val_chunk = 4
  c.eval.max_examples_per_task = 6         # 0 = whole test splits
  c.eval.adapt_k = (0, 10, -1)
  c.eval.max_new_tokens = 256
  return c
