"""The embedded default: three synthetic clinical-note sites (no files needed).

Sites differ in writing style, vocabulary and label mix (fedjax_lora/data/synthetic/).
Labels are the paper's NER types with its definitions (method.md §6); relations are the
paper's modifier types. With a base model the base's own tokenizer is used; without one
(a tiny random model) a small BPE is trained here, so nothing is downloaded.
"""

import ml_collections

PAPER_GLOSSES = {"problem": "a medical problem", "treatment": "a treatment", "test": "a test",
                 "drug": "a drug"}
# (type, line) pairs: the paper's headings and order (method.md §6).
PAPER_DEFINITIONS = (
    ("problem", "Medical Problem: The abnormal condition that happens physically or mentally "
                "to a patient."),
    ("treatment", "Treatment: The procedures, interventions, and substances given to a patient "
                  "for treating a problem."),
    ("drug", "Drug: Generic or brand name of a single medication or a collective name of a "
             "group of medication."),
    ("test", "Test: A medical procedure performed (i) to detect or diagnose a problem, (ii) to "
             "monitor diseases, disease processes, and susceptibility, or (iii) to determine a "
             "course of treatment."),
)
MODIFIER_GLOSSES = {
    "bodyloc": "the location on the body where the observation is present",
    "dosage": "the amount of a drug taken at one time",
    "duration": "how long a treatment or problem lasts",
    "frequency": "how often a drug is taken",
    "labvalue": "the measured value of a test",
    "negation": "a word saying that the marked entity is absent or was not done",
    "route": "how a drug enters the body",
    "severity": "how severe a problem is",
    "temporal": "when the marked entity happened",
}
SITES = ("narrative_hospital", "telegraphic_clinic", "discharge_summary")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_length = 800
  c.loss = "full"           # "full" (paper) or "completion"
  # "paper": the paper's plain "### ..." sections; "chat": the base tokenizer's chat
  # template (instruction + input as the user turn, the answer as the assistant turn).
  c.prompt_format = "paper"
  # "auto": the base model's own tokenizer (config.model.path), or tokenizer_without_base
  # for a tiny random model. A named tokenizer must match the base (vocabulary, specials):
  # "bpe:<vocab>" (trained on the training examples), "llama2" (shared/models/raw),
  # "byte" (259 tokens), or a tokenizer directory.
  c.tokenizer = "auto"
  c.tokenizer_without_base = "bpe:1024"
  c.partition = ml_collections.ConfigDict(dict(kind="natural", num_sites=0, alpha=0.5,
                                               min_size=1))
  c.sites = ml_collections.ConfigDict()
  for name in SITES:
    c.sites[name] = ml_collections.ConfigDict(dict(
        corpus=f"synthetic/{name}", tasks=("ner", "re"), unit="document", pack=True,
        window_tokens=0, empty_fraction=1.0, discontinuous="first_fragment",
        max_train_examples=0, role="train", train_split="train", dev_split="dev",
        test_split="test",
        labels=dict(entity_glosses=PAPER_GLOSSES, entity_definitions=PAPER_DEFINITIONS,
                    relation_glosses=MODIFIER_GLOSSES,
                    entity_order=("problem", "treatment", "test", "drug"),
                    ner_types=("problem", "treatment", "test", "drug"))))
  return c
