"""A deterministic multi-site corpus of short clinical notes: the default when no corpus is given.

Why synthetic: the project must train and evaluate end to end on a fresh machine with no
data on disk. The sites imitate what makes federated clinical IE hard: each writes in its
own style (narrative sentences, telegraphic clinic shorthand, templated discharge
sections), uses its own abbreviations and synonyms ("myocardial infarction" / "MI" /
"Acute myocardial infarction"), and has its own label mix (the clinic is mostly drugs;
the hospital mostly problems and tests; the discharge summaries mostly problems and
procedures) and its own mix of relation types.

Entities use the paper's NER types (problem, treatment, test, drug) plus modifier types;
each relation links an anchor (problem, drug, test or treatment) to one of its modifiers
and is typed with the modifier's type (drug --dosage--> "500 mg"), which is the paper's
RE task. Offsets are recorded while the text is built, never searched for afterwards.
Randomness comes from `random.Random` seeded with a sha256 of (seed, site, style, split),
so a seed gives byte-identical corpora in every process.

Modules: `tables` (data only: label types, styles, clause mixes, lexicons), `grammar` (the
clause writer of each named `Style`) and `assembly` (site assembly, the public API re-exported
here with the tables).
"""

from __future__ import annotations

from fedjax_lora.data.synthetic.assembly import (DEFAULT_DOCS_PER_SITE, DEFAULT_SEED,
                                                 DEFAULT_SITES, SPLITS, make_site, site_names,
                                                 synthetic_sites)
from fedjax_lora.data.synthetic.grammar import Style
from fedjax_lora.data.synthetic.tables import (BODYLOCS, CLAUSES_PER_NOTE, DRUGS, DURATIONS,
                                               ENTITY_TYPES, FREQS, IMAGING, IMAGING_SITES, KINDS,
                                               LABS, LOCAL_PROBLEMS, MAX_CHARS, MODIFIER_TYPES,
                                               NEGATIONS, NER_TYPES, NUMBER_WORDS, PROBLEMS,
                                               RELATION_TYPES, ROUTES, SEVERITIES, STYLE_MIX,
                                               STYLES, SUBJECTS, TEMPORALS, TESTS, TREATMENTS)

__all__ = [
    "BODYLOCS", "CLAUSES_PER_NOTE", "DEFAULT_DOCS_PER_SITE", "DEFAULT_SEED", "DEFAULT_SITES",
    "DRUGS", "DURATIONS", "ENTITY_TYPES", "FREQS", "IMAGING", "IMAGING_SITES", "KINDS", "LABS",
    "LOCAL_PROBLEMS", "MAX_CHARS", "MODIFIER_TYPES", "NEGATIONS", "NER_TYPES", "NUMBER_WORDS",
    "PROBLEMS", "RELATION_TYPES", "ROUTES", "SEVERITIES", "SPLITS", "STYLES", "STYLE_MIX",
    "SUBJECTS", "Style", "TEMPORALS", "TESTS", "TREATMENTS", "make_site", "site_names",
    "synthetic_sites",
]
