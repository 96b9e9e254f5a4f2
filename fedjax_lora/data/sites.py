"""Building federated sites from a data config: corpora -> dedup -> windows -> examples.

A *source* is one corpus with its labels, tasks and windowing (a `config.sites` entry).
With the natural partition every source is a site; the other partitioners pool the
training sources' documents and re-split them into `num_sites` sites. Prompts always
list the labels of an example's own source, so pooling never asks a model for types
that source does not annotate. Everything removed on the way is counted in the report.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Callable, Mapping, Sequence

import numpy as np

from fedjax_lora.data import dedup, partition, windows
from fedjax_lora.data import tasks as task_lib
from fedjax_lora.data.corpora import load_corpus, single_collection
from fedjax_lora.data.records import Corpus, DataError, Document

SPLITS = ("train", "dev", "test")
# train: a federated site. external: held out, test split only (external validation).
# new_site: held out of federated training; its train split serves new-site adaptation.
ROLES = ("train", "external", "new_site")
HELD_OUT = ("external", "new_site")
MARKUP_TOKENS_PER_MENTION = 12  # '<span class="X">' + '</span>' in LLaMA-2 pieces, roughly


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  name: str
  corpus: str
  splits: Mapping[str, str | None]        # our split -> corpus split (None: not used)
  tasks: Sequence[str] = ("ner",)
  labels: task_lib.LabelSpec = task_lib.LabelSpec()
  unit: str = "sentence"
  pack: bool = True
  window_tokens: int | None = None        # text budget per window; None: derived from max_length
  empty_fraction: float = 1.0
  discontinuous: str = "first_fragment"
  max_train_examples: int = 0             # 0: no cap
  role: str = "train"


def source_from_config(name: str, cfg) -> SourceSpec:
  """A SourceSpec from one `config.sites.<name>` ConfigDict (or plain dict)."""
  get = cfg.get
  labels = get("labels", {}) or {}
  labels = dict(labels) if not hasattr(labels, "to_dict") else labels.to_dict()
  allowed = {f.name for f in dataclasses.fields(task_lib.LabelSpec)}
  unknown = set(labels) - allowed
  if unknown:
    raise DataError(f"config.sites.{name}.labels: unknown field(s) {sorted(unknown)}; "
                    f"allowed: {sorted(allowed)}")
  spec = SourceSpec(
      name=name, corpus=get("corpus"),
      splits={s: get(f"{s}_split", s) for s in SPLITS},
      tasks=tuple(get("tasks", ("ner",))), labels=task_lib.LabelSpec(**labels),
      unit=get("unit", "sentence"), pack=bool(get("pack", True)),
      window_tokens=get("window_tokens", None), empty_fraction=float(get("empty_fraction", 1.0)),
      discontinuous=get("discontinuous", "first_fragment"),
      max_train_examples=int(get("max_train_examples", 0) or 0), role=get("role", "train"))
  if not spec.corpus:
    raise DataError(f"config.sites.{name}: `corpus` is required")
  used = [s for s in spec.splits.values() if s is not None]
  if len(used) > 1 and single_collection(spec.corpus):
    raise DataError(f"config.sites.{name}: corpus {spec.corpus!r} is one collection without "
                    f"splits, so it can serve one split only, not {len(used)} ({used}): set the "
                    "other *_split fields to None, or give a folder of split files or a path "
                    "with {split}")
  if spec.role not in ROLES:
    raise DataError(f"config.sites.{name}.role must be one of {ROLES}, got {spec.role!r}")
  for t in spec.tasks:
    if t not in task_lib.TASKS:
      raise DataError(f"config.sites.{name}.tasks: unknown task {t!r}; choose from {task_lib.TASKS}")
  if spec.unit not in windows.UNITS:
    raise DataError(f"config.sites.{name}.unit must be one of {windows.UNITS}")
  if not 0.0 <= spec.empty_fraction <= 1.0:
    raise DataError(f"config.sites.{name}.empty_fraction must be in [0, 1]")
  return spec


@dataclasses.dataclass
class Site:
  name: str
  role: str
  sources: list[str]
  examples: dict[str, list[task_lib.Example]]
  documents: dict[str, list[str]]         # split -> ids of the corpus documents it holds
  stats: dict[str, dict]                  # split -> counts for the report
  skipped: collections.Counter


@dataclasses.dataclass
class SitePlan:
  """The sites, plus each source's reader/dedup/window counts (which pooled sites share)."""
  sites: dict[str, Site]
  sources: dict[str, collections.Counter]


@dataclasses.dataclass
class _Prepared:
  spec: SourceSpec
  labels: tuple[list[str], list[str]]
  windows: dict[str, list[list[Document]]]  # split -> per corpus document, its windows
  docs: dict[str, list[Document]]
  skipped: collections.Counter


def _stable_shuffle(items: list, seed: int, salt: str) -> list:
  rng = np.random.default_rng(int(hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:8], 16))
  return [items[i] for i in rng.permutation(len(items))]


def _window_budget(spec: SourceSpec, docs: Sequence[Document], labels, max_length: int,
                   count: windows.TokenCounter) -> int:
  """Text tokens per window such that prompt + text + tagged text fits `max_length`."""
  if spec.window_tokens:
    return int(spec.window_tokens)
  prompts = [task_lib.ner_prompt("", labels[0], spec.labels)]
  if "re" in spec.tasks:
    prompts.append(task_lib.re_prompt("", labels[0], labels[1], spec.labels))
  overhead = max(count(prompts)) + 8
  sample = list(docs[:200])
  text_tokens = sum(count([d.text for d in sample])) or 1
  density = sum(len(d.entities) for d in sample) / text_tokens
  budget = int((max_length - overhead) / (2 + MARKUP_TOKENS_PER_MENTION * density))
  if budget < 16:
    raise DataError(f"source {spec.name}: max_length {max_length} leaves only {budget} text "
                    "tokens per window after the prompt; raise max_length")
  return budget


def _twins(docs: Sequence[Document], others: Mapping[str, dedup.CorpusIndex], own: str):
  """Document id -> "<corpus> (<key>)" for docs that also occur in another corpus."""
  twins = {}
  for other_name, other_index in others.items():
    if other_name != own:
      for doc_id, why in dedup.overlapping(docs, other_index).items():
        twins.setdefault(doc_id, f"{other_name} ({why.split()[0]})")
  return twins


def _prepare(spec: SourceSpec, corpora: Mapping[tuple[str, str], Corpus],
             others: Mapping[str, dedup.CorpusIndex], external: Mapping[str, dedup.CorpusIndex],
             max_length: int, count: windows.TokenCounter) -> _Prepared:
  """Reads, deduplicates and windows one source.

  Dev and test documents that also occur in another corpus of the plan are removed (the
  dev split feeds the server validation set); training documents that occur in an
  external-validation or new site are removed too, so the held-out site stays unseen (data.md
  §4.2: BioRED abstracts that are also in NCBI-disease).
  """
  skipped = collections.Counter()
  docs = {}
  for split, corpus_split in spec.splits.items():
    if corpus_split is None:
      continue
    corpus = corpora[(spec.corpus, corpus_split)]
    for reason, n in corpus.skipped.items():
      skipped[f"{split}: reader: {reason}"] += n
    kept = corpus.documents
    if split in ("dev", "test"):
      twins = _twins(kept, others, spec.corpus)
    elif spec.role == "train":
      twins = _twins(kept, external, spec.corpus)
    else:
      twins = {}
    for why in twins.values():
      skipped[f"{split}: document also in {why}"] += 1
    docs[split] = [d for d in kept if d.id not in twins]
  label_docs = docs.get("train") or docs.get("test") or next(iter(docs.values()))
  labels = task_lib.source_labels(label_docs, spec.labels)
  budget = _window_budget(spec, label_docs, labels, max_length, count)
  wins = {}
  for split, split_docs in docs.items():
    report = windows.WindowReport()
    wins[split] = [windows.split_document(d, budget, spec.unit, spec.pack, count, report)
                   for d in split_docs]
    skipped[f"{split}: relation mention pairs split across windows"] += \
        report.relations_across_windows
    skipped[f"{split}: relations lost entirely (no pair in one window)"] += \
        report.concept_relations_lost
    skipped[f"{split}: mentions outside every window"] += report.entities_outside_windows
  return _Prepared(spec, labels, wins, docs, +skipped)


def _examples(prep: _Prepared, split: str, members: Sequence[int], seed: int,
              report: task_lib.TaskReport) -> list[task_lib.Example]:
  spec = prep.spec
  wins = [w for i in members for w in prep.windows[split][i]]
  return task_lib.build_examples(spec.name, wins, spec.tasks, spec.labels, prep.labels, report,
                              spec.discontinuous, spec.empty_fraction, seed)


def _stats(examples: Sequence[task_lib.Example], documents: int) -> dict:
  by_task = collections.Counter(e.task for e in examples)
  ent = collections.Counter(s.label for e in examples if e.task == "ner" for s in e.spans)
  rel = collections.Counter(s.label for e in examples if e.task == "re" for s in e.spans)
  # RE targets: related spans marked in RE answers (an undirected relation is a target
  # from both of its ends), not the corpus's relation count.
  return {"documents": documents, "examples": dict(sorted(by_task.items())),
          "entities": dict(sorted(ent.items())), "relation_targets": dict(sorted(rel.items()))}


def training_site_names(config) -> list[str]:
  """The names of a data config's training (federated) sites, in order, without reading
  any corpus: with the natural partition, the sources with role "train"; otherwise the
  pooled sites `site0`, `site1`, ... (`partition.num_sites` of them). `build_sites` names
  its training sites with this function."""
  part = config.get("partition", None) or {}
  if part.get("kind", "natural") == "natural":
    return [name for name, cfg in config.sites.items() if cfg.get("role", "train") == "train"]
  return [f"site{i}" for i in range(int(part.get("num_sites", 0) or 0))]


def build_sites(config, count_tokens: windows.TokenCounter = windows.approx_token_count,
                log: Callable[[str], None] = lambda s: None) -> "SitePlan":
  """All sites of a data config (see configs/data_*.py), deterministic for config.seed."""
  seed = int(config.get("seed", 0))
  max_length = int(config.get("max_length", 800))
  specs = [source_from_config(name, cfg) for name, cfg in config.sites.items()]
  if not specs:
    raise DataError("config.sites is empty")
  corpora = {}
  for spec in specs:
    for corpus_split in dict.fromkeys(s for s in spec.splits.values() if s is not None):
      if (spec.corpus, corpus_split) not in corpora:
        log(f"reading {spec.corpus}/{corpus_split}")
        corpora[(spec.corpus, corpus_split)] = load_corpus(spec.corpus, corpus_split, seed=seed)
  by_corpus = collections.defaultdict(list)
  for (name, _), corpus in corpora.items():
    by_corpus[name].extend(corpus.documents)
  indexes = {name: dedup.index(docs) for name, docs in by_corpus.items()}  # built once
  external = {s.corpus: indexes[s.corpus] for s in specs if s.role in HELD_OUT}
  prepared = {}
  for spec in specs:
    log(f"windowing {spec.name}")
    prepared[spec.name] = _prepare(spec, corpora, indexes, external, max_length,
                                   count_tokens)

  part = config.get("partition", None) or {}
  kind = part.get("kind", "natural")
  if kind not in partition.PARTITIONERS:
    raise DataError(f"config.partition.kind must be one of {partition.PARTITIONERS}, got {kind!r}")
  assignment = _assign(kind, part, prepared, seed, training_site_names(config))
  sites = {}
  for site_name, role, members in assignment:
    examples, documents, stats = {}, {}, {}
    skipped = collections.Counter()
    sources = sorted({src for split_members in members.values() for src, _ in split_members})
    if kind == "natural":  # pooled sites share their sources' counts: see SitePlan.sources
      for src in sources:
        skipped.update(prepared[src].skipped)
    for split in SPLITS:
      split_members = members.get(split)
      if split_members is None:
        continue
      by_source = collections.defaultdict(list)
      for src, i in split_members:
        by_source[src].append(i)
      report = task_lib.TaskReport()
      ex = []
      for src, idx in by_source.items():
        ex += _examples(prepared[src], split, idx, seed, report)
      doc_ids = [prepared[src].docs[split][i].id for src, i in split_members]
      if split == "train":
        ex = _stable_shuffle(ex, seed, f"{site_name}:mix")
        caps = [prepared[s].spec.max_train_examples for s in by_source]
        cap = min([c for c in caps if c] or [0])
        if cap and len(ex) > cap:
          skipped[f"train: examples over max_train_examples={cap}"] += len(ex) - cap
          ex = ex[:cap]
      examples[split], documents[split] = ex, doc_ids
      stats[split] = _stats(ex, len(doc_ids))
      for reason, n in report.counts.items():
        skipped[f"{split}: tasks: {reason}"] += n
    sites[site_name] = Site(site_name, role, sources, examples, documents, stats, +skipped)
  return SitePlan(sites, {name: p.skipped for name, p in prepared.items()})


def _assign(kind: str, part, prepared: Mapping[str, _Prepared], seed: int,
            train_names: Sequence[str]):
  """[(site name, role, {split: [(source, corpus document index)]})]; the training sites
  are named `train_names` (`training_site_names`)."""
  out = []
  external = [p for p in prepared.values() if p.spec.role in HELD_OUT]
  training = [p for p in prepared.values() if p.spec.role == "train"]
  if kind == "natural":  # every training source is a site of its own name
    for p in [prepared[name] for name in train_names] + external:
      out.append((p.spec.name, p.spec.role,
                  {s: [(p.spec.name, i) for i in range(len(d))] for s, d in p.docs.items()}))
    return out
  num_sites = len(train_names)
  if num_sites < 1:
    raise DataError(f"config.partition.num_sites must be >= 1 for partition {kind!r}")
  alpha = float(part.get("alpha", 0.5))
  pooled_members = [dict() for _ in range(num_sites)]
  for split in SPLITS:
    pool = [(p.spec.name, i) for p in training if split in p.docs for i in range(len(p.docs[split]))]
    if not pool:
      continue
    split_seed = seed * 1000 + SPLITS.index(split)
    if kind == "iid":
      parts = partition.iid(len(pool), num_sites, split_seed)
    elif kind == "quantity":
      parts = partition.quantity(len(pool), num_sites, alpha, split_seed,
                                 int(part.get("min_size", 1)))
    else:
      labels = [partition.dominant_label(
          [prepared[src].spec.labels.entity_label(e.type) or "" for e in
           prepared[src].docs[split][i].entities]) for src, i in pool]
      parts = partition.dirichlet(labels, num_sites, alpha, split_seed,
                                  int(part.get("min_size", 1)))
    for s, idx in enumerate(parts):
      pooled_members[s][split] = [pool[i] for i in idx]
  out += [(name, "train", m) for name, m in zip(train_names, pooled_members)]
  for p in external:
    out.append((p.spec.name, p.spec.role,
                {s: [(p.spec.name, i) for i in range(len(d))] for s, d in p.docs.items()}))
  return out
