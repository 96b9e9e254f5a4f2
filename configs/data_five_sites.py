"""The five-site plan of data.md §4: PHEE, Chia, E3C-en, DDI, BioRED; NCBI-disease external.

Each site keeps its own (lightly renamed) label list, so its prompts name only the types it
annotates. Types mapped to None are dropped and counted in the report. Run
`python -m launch.prepare_data --config=configs/data_five_sites.py --out_dir=DIR`.
"""

import ml_collections


DROP = None


def _site(corpus, entity_map, glosses, relation_map=None, relation_glosses=None, **kw):
  labels = dict(entity_map=entity_map, entity_glosses=glosses,
                relation_map=relation_map or {}, relation_glosses=relation_glosses or {},
                undirected=kw.pop("undirected", ()),
                group_by_concept=kw.pop("group_by_concept", False),
                transitive=kw.pop("transitive", ()))
  site = dict(corpus=corpus, tasks=("ner", "re") if relation_glosses else ("ner",),
              unit="sentence", pack=True, window_tokens=0, empty_fraction=1.0,
              discontinuous="first_fragment", max_train_examples=0, role="train",
              train_split="train", dev_split="dev", test_split="test", labels=labels)
  site.update(kw)
  return ml_collections.ConfigDict(site)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_length = 800
  c.loss = "full"
  c.prompt_format = "paper"  # or "chat" (the base tokenizer's chat template)
  c.tokenizer = "auto"     # the base model's own; without a base model:
  c.tokenizer_without_base = "llama2"  # shared/models/raw/llama2_tokenizer
  c.partition = ml_collections.ConfigDict(dict(kind="natural", num_sites=0, alpha=0.5,
                                               min_size=1))
  c.sites = ml_collections.ConfigDict()
  # S1 pharmacovigilance unit: single case-report sentences.
  c.sites.phee = _site(
      "phee",
      # PHEE's Effect is adverse in most events but a benefit in therapeutic ones, so it is
      # not renamed AdverseEffect (that would mislabel about 120 therapeutic effects).
      {"Freq": "Frequency", "Time_elapsed": DROP, "Race": DROP, "Population": DROP},
      {"Drug": "a drug given to the patient",
       "Effect": "an effect of a drug on the patient, adverse or therapeutic",
       "Disorder": "a disorder the patient has or is treated for",
       "Dosage": "the dose of a drug", "Route": "how a drug is administered",
       "Frequency": "how often a drug is given", "Duration": "how long a drug is given",
       "Age": "the patient's age", "Gender": "the patient's gender"},
      {}, {"causes": "an adverse effect caused by the marked drug",
           "treats": "a disorder treated by the marked drug",
           "has_dosage": "the dose of the marked drug",
           "has_route": "the route of the marked drug",
           "has_frequency": "the frequency of the marked drug",
           "has_duration": "the duration of the marked drug",
           "combined_with": "a drug given together with the marked drug"},
      unit="document", undirected=("combined_with",))
  # S2 clinical-trials office: telegraphic eligibility criteria, one criterion per example.
  chia_drop = {t: DROP for t in ("Multiplier", "Mood", "Reference_point", "Visit")}
  c.sites.chia = _site(
      "chia", chia_drop,
      {"Condition": "a disease, disorder or symptom", "Drug": "a drug or drug class",
       "Procedure": "a medical procedure", "Measurement": "a measured quantity or lab test",
       "Observation": "an observed finding or history item", "Value": "a value or range",
       "Temporal": "a time constraint", "Qualifier": "a qualifier of another entity",
       "Person": "a demographic attribute of the person", "Device": "a medical device",
       "Negation": "a negation cue"},
      {t: DROP for t in ("Has_multiplier", "Has_mood", "Has_index", "Has_context", "multi")},
      {"Has_value": "the value of the marked entity",
       "Has_temporal": "the time constraint of the marked entity",
       "Has_qualifier": "a qualifier of the marked entity",
       "Has_negation": "the negation of the marked entity",
       "Subsumes": "an entity subsumed by the marked entity",
       "AND": "an entity joined to the marked entity by AND",
       "OR": "an alternative to the marked entity (OR)"},
      unit="line", pack=False, undirected=("AND",), transitive=("OR",))
  # S3 internal-medicine ward: long case narratives (layer-1 gold; no official dev split).
  c.sites.e3c = _site(
      "e3c",
      {"CLINENTITY": "ClinicalEntity", "EVENT": "Event", "TIMEX3": "Time",
       "BODYPART": "BodyPart", "ACTOR": "Actor", "RML": "LabResult"},
      {"ClinicalEntity": "a disease, symptom or clinical finding",
       "Event": "an event or situation in the patient's course",
       "Time": "a temporal expression", "BodyPart": "a part of the body",
       "Actor": "a person taking part (patient, health professional, other)",
       "LabResult": "a result or measurement"},
      {}, {"BEFORE": "an event or time that the marked entity happens before",
           "CONTAINS": "an event or time contained in the marked entity's time span",
           "OVERLAP": "an event or time overlapping the marked entity in time",
           "SIMULTANEOUS": "an event or time simultaneous with the marked entity",
           "BEGINS-ON": "the event or time on which the marked entity begins",
           "ENDS-ON": "the event or time on which the marked entity ends",
           "INITIATES": "an event that the marked entity initiates",
           "CONTINUES": "an event that the marked entity continues",
           "TERMINATES": "an event that the marked entity terminates",
           "REINITIATES": "an event that the marked entity reinitiates",
           "PERTAINS": "the event the marked result or measurement pertains to"},
      dev_split=None)
  # S4 hospital pharmacy: drug labels and abstracts; keep a share of sentences without drugs.
  c.sites.ddi = _site(
      "ddi", {"drug": "Drug", "brand": "Brand", "group": "DrugGroup", "drug_n": "DrugN"},
      {"Drug": "a generic drug name", "Brand": "a brand name of a drug",
       "DrugGroup": "a group or class of drugs",
       "DrugN": "a substance not approved for human use"},
      {}, {"mechanism": "a drug whose pharmacokinetic interaction with the marked drug is "
                        "described",
           "effect": "a drug whose interaction effect with the marked drug is described",
           "advise": "a drug for which advice about combining it with the marked drug is given",
           "int": "a drug said to interact with the marked drug"},
      empty_fraction=0.25, undirected=("mechanism", "effect", "advise", "int"))
  # S5 academic research hospital: PubMed abstracts, document-level relations.
  biored_rel = ("Association", "Positive_Correlation", "Negative_Correlation", "Bind",
                "Cotreatment", "Comparison", "Drug_Interaction", "Conversion")
  c.sites.biored = _site(
      "biored",
      {"GeneOrGeneProduct": "Gene", "DiseaseOrPhenotypicFeature": "Disease",
       "ChemicalEntity": "Chemical", "SequenceVariant": "Variant", "OrganismTaxon": "Species"},
      {"Gene": "a gene or gene product", "Disease": "a disease or phenotypic feature",
       "Chemical": "a chemical or drug", "Variant": "a sequence variant",
       "Species": "an organism or species", "CellLine": "a cell line"},
      {}, {r: f"an entity in a {r.replace('_', ' ').lower()} relation with the marked entity"
           for r in biored_rel},
      undirected=biored_rel, group_by_concept=True)
  # External validation (never trained on): NCBI-disease test, Disease-only prompt.
  c.sites.ncbi_disease = _site(
      "ncbi_disease", {}, {"Disease": "a disease"}, role="external", train_split=None,
      dev_split=None, unit="document")
  return c
