"""Evaluation settings on the synthetic default (`python -m launch.evaluate --workdir=DIR`).

The three default sites train; two more synthetic hospitals are held out: one for
external validation (test split only, never trained on) and one as the low-resource new
site (its training split is only used for new-site adaptation). Same tiny model and
training budget as configs/federate.py:tiny; every field can be overridden on the command line.
"""

import ml_collections

from configs import federate


def get_config() -> ml_collections.ConfigDict:
  c = federate.get_config("tiny")
  c.run.rounds = 3
  c.eval.max_new_tokens = 512  # whole answers for a real checkpoint (--config.model.path)
  held_out = dict(corpus="", tasks=("ner", "re"), unit="document", pack=True, window_tokens=0,
                  empty_fraction=1.0, discontinuous="first_fragment", max_train_examples=0,
                  train_split="train", dev_split="dev", test_split="test",
                  labels=c.data.sites.narrative_hospital.labels.to_dict())
  c.data.sites.telegraphic_clinic_2 = ml_collections.ConfigDict(
      {**held_out, "corpus": "synthetic/telegraphic_clinic_2", "role": "external",
       "train_split": None, "dev_split": None})
  c.data.sites.discharge_summary_2 = ml_collections.ConfigDict(
      {**held_out, "corpus": "synthetic/discharge_summary_2", "role": "new_site",
       "dev_split": None})
  return c
