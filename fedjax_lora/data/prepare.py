"""From a data config to tokenized per-site arrays and a report (what `prepare_data` prints).

The report is the audit trail of the data side: per site and split, documents, examples
per task, entities and relations per type, supervised tokens (n_k), truncated examples
and every skipped item with its reason. The document ids of every split are written next
to the processed data so every run uses the same splits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from fedjax_lora.data import arrays as arrays_lib, encoding, sites as sites_lib, templates
from fedjax_lora.data.records import DataError
from fedjax_lora.paths import shared_dir

LLAMA2_TOKENIZER = ("models", "raw", "llama2_tokenizer")
# config.tokenizer value meaning "the base model's own" (config.tokenizer_without_base when
# the run has no base checkpoint, e.g. a tiny random model).
AUTO = "auto"


@dataclasses.dataclass
class PreparedData:
  sites: dict[str, sites_lib.Site]
  arrays: dict[str, dict[str, arrays_lib.SiteArrays]]
  tokenizer: object
  report: dict
  renderer: templates.Renderer | None = None  # how examples become text (prompt_format)


def resolve_tokenizer(spec: str, out_dir: str | os.PathLike | None, train_texts=()):
  """"byte", "llama2" (shared/models/raw), "bpe:<vocab>" (trained on train_texts) or a dir."""
  from models.tokenizer import build_byte_tokenizer, load_tokenizer

  if spec == "byte" or spec.startswith("bpe:"):
    if out_dir:
      tok_dir = Path(out_dir) / "tokenizer"
    else:  # nothing to keep: a throwaway directory, as `save_pretrained` needs one
      import tempfile
      tok_dir = Path(tempfile.mkdtemp(prefix="fedjax_tokenizer_"))
  if spec == "byte":
    return build_byte_tokenizer(tok_dir)
  if spec.startswith("bpe:"):
    from fedjax_lora.data.bpe import train_bpe
    try:
      vocab = int(spec.split(":", 1)[1])
    except ValueError:
      raise DataError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:4096") from None
    return train_bpe(train_texts, vocab, tok_dir)
  path = shared_dir().joinpath(*LLAMA2_TOKENIZER) if spec == "llama2" else Path(spec)
  return load_tokenizer(path)


def token_counter(tokenizer):
  def count(texts):
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
  return count


def split_arrays(examples, renderer: templates.Renderer, config, cache=None,
                 cache_key: dict | None = None) -> arrays_lib.SiteArrays:
  """One split's examples as padded arrays, as data config `config` says (max_length,
  loss); the one place the prepared data, a deployed site and its coordinator tokenize."""
  max_length = int(config.get("max_length", 800))
  tokenizer = renderer.tokenizer
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  enc = encoding.encode(examples, renderer, max_length, cache, cache_key)
  return arrays_lib.to_arrays(enc, pad_id, max_length, config.get("loss", "full"))


def prepare(config, out_dir: str | os.PathLike | None = None, tokenizer=None,
            log: Callable[[str], None] = print) -> PreparedData:
  """Builds sites, tokenizes every split (Arrow-cached under out_dir/cache) and reports."""
  max_length = int(config.get("max_length", 800))
  loss = config.get("loss", "full")
  if loss not in arrays_lib.LOSS_MODES:
    raise DataError(f"config.loss must be one of {arrays_lib.LOSS_MODES}, got {loss!r}")
  spec = config.get("tokenizer", "byte")
  if spec == AUTO:  # no base model brought its own tokenizer: the config's fallback
    spec = config.get("tokenizer_without_base", "bpe:1024")
  if tokenizer is None and not spec.startswith("bpe:"):
    tokenizer = resolve_tokenizer(spec, out_dir)
  count = token_counter(tokenizer) if tokenizer is not None else None
  plan = sites_lib.build_sites(config, **({"count_tokens": count} if count else {}), log=log)
  sites = plan.sites
  if tokenizer is None:  # bpe: train on the training examples only, never on test text
    texts = [e.prompt + e.target for s in sites.values() for e in s.examples.get("train", [])]
    log(f"training {spec} tokenizer on {len(texts)} training examples")
    tokenizer = resolve_tokenizer(spec, out_dir, texts)
  renderer = templates.make_renderer(tokenizer, config.get("prompt_format", "paper"))
  cache = Path(out_dir) / "cache" if out_dir else None
  config_blob = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  arrays, report = {}, {"max_length": max_length, "loss": loss, "sites": {},
                        "tokenizer": getattr(tokenizer, "name_or_path", "") or spec,
                        "prompt_format": renderer.format,
                        "sources": {n: dict(sorted(c.items())) for n, c in plan.sources.items()}}
  for name, site in sites.items():
    arrays[name] = {}
    site_report = {"role": site.role, "sources": site.sources, "splits": {},
                   "skipped": dict(sorted(site.skipped.items()))}
    for split, examples in site.examples.items():
      if not examples:
        raise DataError(f"site {name}: split {split} has no examples; check its corpus split "
                        "and label map")
      log(f"tokenizing {name}/{split}: {len(examples)} examples")
      arr = split_arrays(examples, renderer, config, cache,
                         {"site": name, "split": split, "config": config_blob})
      arrays[name][split] = arr
      site_report["splits"][split] = {**site.stats[split], "tokens": arr.token_count,
                                      "sequence_length": int(arr.tokens.shape[1]),
                                      "truncated": arr.truncated,
                                      "without_target_tokens": arr.without_targets}
    report["sites"][name] = site_report
  if out_dir is not None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps(
        {n: s.documents for n, s in sites.items()}, indent=1, sort_keys=True))
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
  return PreparedData(sites, arrays, tokenizer, report, renderer)


def _fmt_counts(counts: dict, limit: int = 8) -> str:
  items = sorted(counts.items(), key=lambda kv: -kv[1])
  text = ", ".join(f"{k} {v}" for k, v in items[:limit])
  return text + (f", +{len(items) - limit} more" if len(items) > limit else "") or "-"


def report_table(report: dict) -> str:
  """A Markdown table (one row per site and split) plus per-type and skip details."""
  rows = ["| site | role | split | docs | NER ex. | RE ex. | entities | RE targets | tokens | "
          "truncated |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  details = []
  for name, site in report["sites"].items():
    for split, s in site["splits"].items():
      rows.append(f"| {name} | {site['role']} | {split} | {s['documents']} | "
                  f"{s['examples'].get('ner', 0)} | {s['examples'].get('re', 0)} | "
                  f"{sum(s['entities'].values())} | {sum(s['relation_targets'].values())} | "
                  f"{s['tokens']} | {s['truncated']} |")
    train = site["splits"].get("train") or next(iter(site["splits"].values()))
    details.append(f"- **{name}** entities: {_fmt_counts(train['entities'])}; RE targets: "
                   f"{_fmt_counts(train['relation_targets'])}")
    skipped = {k: v for k, v in site["skipped"].items() if v}
    details.append(f"  skipped: {_fmt_counts(skipped, 12)}")
  if any(site["sources"] != [name] for name, site in report["sites"].items()):
    for name, counts in report["sources"].items():  # pooled sites: counts per source
      details.append(f"- source **{name}** skipped: "
                     f"{_fmt_counts({k: v for k, v in counts.items() if v}, 12)}")
  return "\n".join(rows + [""] + details)
