r"""How many decoding programs an evaluation compiles: the prompts of a config's test sets,
grouped as `fedjax_lora.eval.decoding.Decoder` groups them.

  python -m launch.decode_shapes --config=configs/evaluate_five_sites.py \
      --config.model.path=smollm2-135m-instruct --config.data.prompt_format=chat

Prints, for the evaluated examples (config.eval.max_examples_per_task per site and task)
and for whole test splits: prompts, distinct programs now (one per power-of-two prompt
length and batch shape, every row stopping at its own budget), and as grouped before
per-row budgets (one per prompt bucket and power-of-two budget), per adapter count.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

import configs
from fedjax_lora import experiment
from fedjax_lora.data.arrays import bucket_size
from fedjax_lora.eval import decoding, evaluator, settings
from launch import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(configs.__file__).parent / "evaluate_five_sites.py"),
    "Evaluation config (as for launch.evaluate); override fields as --config.a.b=value.")


def budget_bucket(n_input_tokens: int, cfg: decoding.DecodeConfig) -> int:
  """The power-of-two budget the Decoder compiled per group before per-row budgets."""
  want = max(cfg.min_new_tokens, decoding.budget(n_input_tokens, cfg))
  return bucket_size(want, minimum=cfg.min_new_tokens, cap=cfg.max_new_tokens)


def count(example_sets, renderer, tokenizer, cfg) -> dict:
  """Programs over the Decoder calls of an evaluation: one call per site and task."""
  now, before, prompts = set(), set(), []
  for examples in example_sets:
    ids = renderer.prompt_ids([e.prompt for e in examples])
    inputs = [len(x) for x in tokenizer([e.text for e in examples],
                                        add_special_tokens=False)["input_ids"]]
    per_bucket = collections.Counter(decoding.prompt_bucket(len(p)) for p in ids)
    now |= {(b, size) for b, n in per_bucket.items()
            for size in decoding.batch_sizes(n, cfg.batch_size)}
    before |= {(decoding.prompt_bucket(len(p)), budget_bucket(n, cfg))
               for p, n in zip(ids, inputs)}
    prompts += ids
  return {"prompts": len(prompts), "programs_now": len(now), "programs_before": len(before),
          "prompt_buckets": dict(sorted(collections.Counter(
              decoding.prompt_bucket(len(p)) for p in prompts).items()))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  log = lambda s: print(s, file=sys.stderr, flush=True)
  data = experiment.prepare_data(config, None, log)
  cfg = settings.decode_config(config.eval)
  chosen, whole = [], []
  for site in data.sites.values():
    test = site.examples.get("test") or []
    for cap, out in ((config.eval.max_examples_per_task, chosen), (0, whole)):
      out += [es.examples for es in evaluator.eval_sets(site.name, test, cap).values()]
  for name, examples in (("evaluated examples", chosen), ("whole test splits", whole)):
    c = count(examples, data.renderer, data.tokenizer, cfg)
    print(f"{name}: {c['prompts']} prompts; {c['programs_now']} decoding programs per adapter "
          f"count (before per-row budgets: {c['programs_before']}); prompt buckets "
          f"{c['prompt_buckets']}")


if __name__ == "__main__":
  errors.run(main)
