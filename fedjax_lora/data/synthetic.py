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
"""

from __future__ import annotations

import hashlib
import random
from typing import Collection, Mapping, Sequence

from fedjax_lora.data.records import Corpus, Document, Entity, Relation, validate_document

NER_TYPES = ("problem", "treatment", "test", "drug")
MODIFIER_TYPES = ("bodyloc", "dosage", "duration", "frequency", "labvalue", "negation", "route",
                  "severity", "temporal")
ENTITY_TYPES = NER_TYPES + MODIFIER_TYPES
RELATION_TYPES = MODIFIER_TYPES  # a relation is typed with its modifier's entity type
STYLES = ("narrative", "telegraphic", "discharge")
SPLITS = ("train", "dev", "test")
DEFAULT_SITES = (("narrative_hospital", "narrative"), ("telegraphic_clinic", "telegraphic"),
                 ("discharge_summary", "discharge"))
DEFAULT_DOCS_PER_SITE = ((200, 20, 40), (120, 20, 40), (60, 20, 40))  # (train, dev, test)
DEFAULT_SEED = 0
MAX_CHARS = 400

# Clause kinds and how often each style writes them: this is the label-distribution skew.
KINDS = ("problem", "local", "negation", "lab", "imaging", "test", "drug", "treatment")
STYLE_MIX = {
    "narrative": dict(problem=3, local=2, negation=2, lab=2.5, imaging=1.5, test=1.5, drug=1,
                      treatment=1),
    "telegraphic": dict(problem=1, local=1, negation=1, lab=1, imaging=0.5, test=0.5, drug=7,
                        treatment=0.5),
    "discharge": dict(problem=3, local=1, negation=0.5, lab=1, imaging=0.7, test=0.5, drug=2,
                      treatment=3.5),
}
CLAUSES_PER_NOTE = {"narrative": (1, 3, 3, 2), "telegraphic": (1, 2, 3, 3),
                    "discharge": (0, 3, 3, 2)}  # weights for 1, 2, 3, 4 clauses

# --- Lexicons. Every entry gives (narrative, telegraphic, discharge) forms; a form may be
# a tuple of alternatives. Different forms per style are the sites' vocabulary shift.

PROBLEMS = {
    "dm2": ("type 2 diabetes", ("DM2", "T2DM"), "Type 2 diabetes mellitus"),
    "htn": (("hypertension", "high blood pressure"), "HTN",
            ("Hypertension", "Essential hypertension")),
    "mi": (("myocardial infarction", "a heart attack"), ("MI", "NSTEMI"),
           "Acute myocardial infarction"),
    "chf": (("heart failure", "congestive heart failure"), "CHF",
            ("Congestive heart failure", "Heart failure with reduced ejection fraction")),
    "afib": ("atrial fibrillation", ("AFib", "AF", "a-fib"), "Atrial fibrillation"),
    "pna": ("pneumonia", ("PNA", "CAP"), "Community-acquired pneumonia"),
    "copd": (("chronic obstructive pulmonary disease", "emphysema"), "COPD", "COPD exacerbation"),
    "asthma": ("asthma", ("asthma", "RAD"), "Asthma exacerbation"),
    "uti": ("urinary tract infection", "UTI", ("Urinary tract infection", "Cystitis")),
    "cp": ("chest pain", "CP", "Chest pain"),
    "sob": (("shortness of breath", "breathlessness"), ("SOB", "DOE"), "Dyspnea"),
    "nausea": (("nausea", "vomiting"), ("N/V", "nausea"), "Nausea and vomiting"),
    "fever": (("fever", "chills"), ("fever", "fevers", "chills"), "Fever"),
    "cough": (("cough", "a productive cough"), ("cough", "prod cough"), "Cough"),
    "aki": ("acute kidney injury", "AKI", "Acute kidney injury"),
    "ckd": ("chronic kidney disease", ("CKD", "CKD3"), ("Chronic kidney disease stage 3",
                                                          "CKD stage 4")),
    "dvt": (("deep vein thrombosis", "a blood clot"), "DVT", "Deep vein thrombosis"),
    "pe": (("pulmonary embolism", "a pulmonary embolus"), "PE", "Pulmonary embolism"),
    "cva": (("stroke", "a stroke"), ("CVA", "TIA"),
            ("Ischemic stroke", "Cerebrovascular accident")),
    "anemia": ("anemia", "anemia", ("Iron deficiency anemia", "Anemia of chronic disease")),
    "hld": (("high cholesterol", "hyperlipidemia"), ("HLD", "HLP"), "Hyperlipidemia"),
    "hypothyroid": ("hypothyroidism", ("hypothyroid", "hypoT4"), "Hypothyroidism"),
    "mdd": (("depression", "low mood"), ("MDD", "depression"), "Major depressive disorder"),
    "anxiety": (("anxiety", "panic attacks"), ("anxiety", "GAD"), "Generalized anxiety disorder"),
    "gerd": (("acid reflux", "heartburn"), "GERD", "Gastroesophageal reflux disease"),
    "sepsis": ("sepsis", ("sepsis", "SIRS"), ("Sepsis", "Septic shock")),
    "headache": (("headache", "headaches"), "HA", ("Migraine headache", "Tension headache")),
    "dizzy": (("dizziness", "lightheadedness"), ("dizzy", "dizziness"), "Vertigo"),
    "oa": (("osteoarthritis", "arthritis"), ("OA", "DJD"), "Osteoarthritis"),
    "gout": ("gout", ("gout", "gouty arthritis"), "Gout flare"),
    "hypogly": (("low blood sugar", "hypoglycemia"), ("hypoglycemia", "low BG"), "Hypoglycemia"),
    "hyperk": ("high potassium", ("hyperK", "hyperkalemia"), "Hyperkalemia"),
    "hypok": ("low potassium", ("hypoK", "hypokalemia"), "Hypokalemia"),
    "syncope": (("fainting", "a syncopal episode"), "syncope", "Syncope"),
    "seizure": (("seizures", "a seizure"), ("sz", "seizure"), "Seizure disorder"),
    "obesity": ("obesity", ("obese", "obesity"), "Morbid obesity"),
    "insomnia": (("trouble sleeping", "insomnia"), "insomnia", "Insomnia"),
    "confusion": (("confusion", "delirium"), ("AMS", "confused"), "Altered mental status"),
    "diarrhea": ("diarrhea", ("diarrhea", "loose stools"), ("C. difficile colitis", "Diarrhea")),
    "bleed": (("bleeding", "blood in the stool"), ("GIB", "melena"),
              "Upper gastrointestinal bleed"),
    "appendicitis": ("appendicitis", ("appendicitis", "appy"), "Acute appendicitis"),
    "gallstones": ("gallstones", "cholelithiasis", "Acute cholecystitis"),
    "strep": ("strep throat", "strep pharyngitis", "Streptococcal pharyngitis"),
    "osa": ("sleep apnea", "OSA", "Obstructive sleep apnea"),
    "neuropathy": (("neuropathy", "numb feet"), "neuropathy", "Diabetic neuropathy"),
    "hernia": ("a herniated disc", "HNP", "Lumbar disc herniation"),
    "effusion": ("an effusion", "effusion", "Joint effusion"),
    "hemorrhage": ("a bleed", "ICH", "Intracranial hemorrhage"),
    "fracture": ("a fracture", "fx", "Fracture"),
    "mass": ("a mass", "mass", "Pulmonary nodule"),
    "eczema": ("eczema", ("eczema", "derm"), "Atopic dermatitis"),
}
# Problems that take a body location; the location is its own (bodyloc) mention.
LOCAL_PROBLEMS = {
    "pain": (("pain", "aching"), "pain", "Pain"),
    "swelling": ("swelling", ("swelling", "edema"), "Edema"),
    "rash": (("a rash", "redness"), ("rash", "erythema"), "Rash"),
    "cellulitis": ("cellulitis", "cellulitis", "Cellulitis"),
    "fracture": ("a fracture", "fx", "Closed fracture"),
    "laceration": (("a cut", "a laceration"), "lac", "Laceration"),
    "weakness": ("weakness", ("weakness", "weak"), "Weakness"),
    "numbness": (("numbness", "tingling"), ("numbness", "paresthesias"), "Paresthesia"),
    "tenderness": ("tenderness", ("TTP", "tenderness"), "Tenderness"),
    "bruising": (("bruising", "a bruise"), "ecchymosis", "Contusion"),
    "ulcer": (("an ulcer", "a sore"), "ulcer", "Pressure ulcer"),
    "abscess": ("an abscess", "abscess", "Abscess"),
}
BODYLOCS = (
    ("left knee", "L knee", "left knee"), ("right knee", "R knee", "right knee"),
    ("lower back", ("low back", "LS spine"), "lumbar region"),
    ("left leg", "LLE", "left lower extremity"), ("right leg", "RLE", "right lower extremity"),
    ("left arm", "LUE", "left upper extremity"), ("right arm", "RUE", "right upper extremity"),
    ("right hip", "R hip", "right hip"), ("left shoulder", "L shoulder", "left shoulder"),
    ("neck", ("neck", "C-spine"), "cervical region"), ("left foot", "L foot", "left foot"),
    ("right ankle", "R ankle", "right ankle"), ("abdomen", "abd", "abdomen"),
    ("right lower quadrant", "RLQ", "right lower quadrant"),
    ("chest wall", "chest wall", "anterior chest wall"), ("left hand", "L hand", "left hand"),
    ("sacrum", "sacral", "sacrum"), ("forehead", "forehead", "forehead"),
    ("right shoulder", "R shoulder", "right shoulder"), ("left wrist", "L wrist", "left wrist"),
)
# Imaging: modality x (location, plausible findings).
IMAGING = (("CT scan", "CT", "CT"), ("MRI", "MRI", "MRI"), ("x-ray", ("XR", "plain film"), "X-ray"),
           ("ultrasound", "US", "Ultrasound"))
IMAGING_SITES = (
    (("head", "head", "head"), ("cva", "hemorrhage")),
    (("chest", "chest", "chest"), ("pna", "pe", "mass")),
    (("abdomen", "abd", "abdomen"), ("appendicitis", "gallstones")),
    (("lumbar spine", "L-spine", "lumbar spine"), ("hernia", "fracture")),
    (("left knee", "L knee", "left knee"), ("effusion", "fracture")),
    (("right hip", "R hip", "right hip"), ("fracture", "oa")),
    (("left leg", "LLE", "left lower extremity"), ("dvt",)),
    (("pelvis", "pelvis", "pelvis"), ("fracture",)),
)
# Other tests: (forms, findings).
TESTS = (
    (("chest x-ray", "CXR", "Chest radiograph"), ("pna", "chf", "mass")),
    (("EKG", "ECG", "Electrocardiogram"), ("afib", "mi")),
    (("echocardiogram", ("TTE", "echo"), "Transthoracic echocardiogram"), ("chf",)),
    (("urinalysis", "UA", "Urinalysis"), ("uti",)),
    (("blood cultures", "BCx", "Blood cultures"), ("sepsis",)),
    (("stress test", "stress test", "Nuclear stress test"), ("mi",)),
    (("colonoscopy", "c-scope", "Colonoscopy"), ("bleed", "mass")),
    (("EEG", "EEG", "Electroencephalogram"), ("seizure",)),
    (("urine culture", "UCx", "Urine culture"), ("uti",)),
    (("pulmonary function tests", "PFTs", "Pulmonary function testing"), ("copd", "asthma")),
    (("COVID test", "COVID PCR", "SARS-CoV-2 PCR"), ("pna",)),
    (("rapid strep test", "rapid strep", "Rapid streptococcal antigen test"), ("strep",)),
    (("endoscopy", "EGD", "Upper endoscopy"), ("gerd", "bleed")),
    (("sleep study", "PSG", "Polysomnography"), ("osa",)),
    (("nerve conduction study", "NCS", "Nerve conduction studies"), ("neuropathy",)),
)
# Labs and vitals: (forms, unit, low, high, decimals).
LABS = (
    (("hemoglobin A1c", "A1c", "Hemoglobin A1c"), "%", 5.5, 12.5, 1),
    (("creatinine", "Cr", "Creatinine"), "mg/dL", 0.6, 4.5, 1),
    (("potassium", "K", "Potassium"), "mmol/L", 2.9, 6.5, 1),
    (("sodium", "Na", "Sodium"), "mmol/L", 122, 149, 0),
    (("troponin", ("trop", "TnI"), "Troponin I"), "ng/mL", 0.01, 2.5, 2),
    (("hemoglobin", ("Hgb", "Hb"), "Hemoglobin"), "g/dL", 6.5, 16.5, 1),
    (("white count", "WBC", "White blood cell count"), "K/uL", 2.1, 24.0, 1),
    (("blood sugar", ("BG", "FSBG"), "Glucose"), "mg/dL", 45, 420, 0),
    (("TSH", "TSH", "TSH"), "mIU/L", 0.1, 12.0, 2),
    (("INR", "INR", "INR"), "", 0.9, 5.5, 1),
    (("BNP", "BNP", "BNP"), "pg/mL", 40, 2400, 0),
    (("lactate", ("lactate", "lac"), "Lactate"), "mmol/L", 0.8, 6.5, 1),
    (("platelet count", "plt", "Platelets"), "K/uL", 45, 480, 0),
    (("LDL", "LDL", "LDL cholesterol"), "mg/dL", 60, 210, 0),
    (("oxygen saturation", ("SpO2", "O2 sat"), "Oxygen saturation"), "%", 82, 99, 0),
    (("temperature", ("T", "Tmax"), "Temperature"), "C", 36.1, 40.2, 1),
    (("blood pressure", "BP", "Blood pressure"), "mmHg", 88, 190, 0),
    (("heart rate", ("HR", "pulse"), "Heart rate"), "bpm", 48, 145, 0),
    (("lipase", "lipase", "Lipase"), "U/L", 20, 900, 0),
    (("ALT", "ALT", "ALT"), "U/L", 12, 450, 0),
)
# Routes and frequencies by key.
ROUTES = {
    "po": (("by mouth", "orally"), "PO", ("oral", "by mouth")),
    "iv": ("intravenously", "IV", ("IV", "intravenous")),
    "sc": ("subcutaneously", ("SC", "SQ"), "subcutaneous"),
    "inh": ("inhaled", ("INH", "neb"), "inhaled"),
    "sl": ("under the tongue", "SL", "sublingual"),
    "top": ("topically", "TOP", "topical"),
}
FREQS = {
    "qd": (("once daily", "daily", "every day"), ("QD", "daily", "qday"), ("daily", "once a day")),
    "bid": (("twice daily", "twice a day"), ("BID", "bid"), ("twice a day", "twice daily")),
    "tid": (("three times daily", "three times a day"), ("TID", "tid"), "three times a day"),
    "qid": ("four times daily", "QID", "four times a day"),
    "q4h": ("every 4 hours", ("q4h", "Q4H"), "every 4 hours"),
    "q6h": ("every 6 hours", ("q6h", "Q6H"), "every 6 hours"),
    "q8h": ("every 8 hours", ("q8h", "Q8H"), "every 8 hours"),
    "q12h": ("every 12 hours", ("q12h", "Q12H"), "every 12 hours"),
    "qhs": (("at bedtime", "nightly"), ("QHS", "qhs"), "at bedtime"),
    "prn": ("as needed", ("PRN", "prn"), "as needed"),
}
# Drugs: (forms, doses, routes, frequencies, indications).
DRUGS = (
    (("metformin", "metformin", "Metformin"), ("500 mg", "850 mg", "1000 mg"), ("po",),
     ("bid", "qd"), ("dm2",)),
    (("lisinopril", "lisinopril", "Lisinopril"), ("10 mg", "20 mg", "40 mg"), ("po",), ("qd",),
     ("htn", "chf")),
    (("atorvastatin", ("atorva", "Lipitor"), "Atorvastatin"), ("20 mg", "40 mg", "80 mg"),
     ("po",), ("qhs", "qd"), ("hld", "mi")),
    (("aspirin", "ASA", "Aspirin"), ("81 mg", "325 mg"), ("po",), ("qd",), ("mi", "cva")),
    (("metoprolol", ("metoprolol", "Toprol"), "Metoprolol tartrate"), ("25 mg", "50 mg"),
     ("po",), ("bid",), ("afib", "htn", "mi")),
    (("furosemide", "Lasix", "Furosemide"), ("20 mg", "40 mg", "80 mg"), ("po", "iv"),
     ("qd", "bid"), ("chf",)),
    (("warfarin", "Coumadin", "Warfarin"), ("2.5 mg", "5 mg"), ("po",), ("qd",), ("afib", "dvt")),
    (("apixaban", "Eliquis", "Apixaban"), ("2.5 mg", "5 mg"), ("po",), ("bid",),
     ("afib", "pe", "dvt")),
    (("insulin glargine", "Lantus", "Insulin glargine"), ("10 units", "20 units", "30 units"),
     ("sc",), ("qhs", "qd"), ("dm2",)),
    (("insulin lispro", "Humalog", "Insulin lispro"), ("4 units", "6 units", "8 units"), ("sc",),
     ("tid",), ("dm2",)),
    (("amoxicillin", "amox", "Amoxicillin"), ("500 mg", "875 mg"), ("po",), ("tid", "bid"),
     ("pna", "strep")),
    (("ceftriaxone", "CTX", "Ceftriaxone"), ("1 g", "2 g"), ("iv",), ("qd",),
     ("pna", "uti", "sepsis")),
    (("vancomycin", "vanc", "Vancomycin"), ("1 g", "1.5 g"), ("iv",), ("q12h",), ("sepsis",)),
    (("levothyroxine", ("Synthroid", "levo"), "Levothyroxine"), ("50 mcg", "75 mcg", "100 mcg"),
     ("po",), ("qd",), ("hypothyroid",)),
    (("omeprazole", "Prilosec", "Omeprazole"), ("20 mg", "40 mg"), ("po",), ("qd",), ("gerd",)),
    (("sertraline", "Zoloft", "Sertraline"), ("50 mg", "100 mg"), ("po",), ("qd",),
     ("mdd", "anxiety")),
    (("acetaminophen", ("APAP", "Tylenol"), "Acetaminophen"), ("500 mg", "650 mg", "1000 mg"),
     ("po",), ("q6h", "prn"), ("fever", "headache")),
    (("ibuprofen", "Motrin", "Ibuprofen"), ("400 mg", "600 mg", "800 mg"), ("po",),
     ("q8h", "prn"), ("oa", "headache")),
    (("prednisone", "pred", "Prednisone"), ("10 mg", "20 mg", "40 mg"), ("po",), ("qd",),
     ("copd", "asthma", "gout")),
    (("albuterol", ("albuterol", "alb"), "Albuterol"), ("2 puffs", "2.5 mg"), ("inh",),
     ("q4h", "prn"), ("asthma", "copd")),
    (("heparin", "hep", "Heparin"), ("5000 units",), ("sc",), ("q8h", "q12h"), ("dvt",)),
    (("morphine", "MSO4", "Morphine"), ("2 mg", "4 mg"), ("iv",), ("q4h", "prn"), ("mi",)),
    (("ondansetron", "Zofran", "Ondansetron"), ("4 mg", "8 mg"), ("iv", "po"), ("q8h", "prn"),
     ("nausea",)),
    (("amlodipine", "Norvasc", "Amlodipine"), ("5 mg", "10 mg"), ("po",), ("qd",), ("htn",)),
    (("gabapentin", "Neurontin", "Gabapentin"), ("100 mg", "300 mg"), ("po",), ("tid",),
     ("neuropathy",)),
    (("allopurinol", "allopurinol", "Allopurinol"), ("100 mg", "300 mg"), ("po",), ("qd",),
     ("gout",)),
    (("colchicine", "colchicine", "Colchicine"), ("0.6 mg",), ("po",), ("bid", "qd"), ("gout",)),
    (("azithromycin", ("azithro", "Z-pak"), "Azithromycin"), ("250 mg", "500 mg"), ("po",),
     ("qd",), ("pna", "copd")),
    (("clopidogrel", "Plavix", "Clopidogrel"), ("75 mg",), ("po",), ("qd",), ("mi", "cva")),
    (("hydrochlorothiazide", "HCTZ", "Hydrochlorothiazide"), ("12.5 mg", "25 mg"), ("po",),
     ("qd",), ("htn",)),
    (("potassium chloride", "KCl", "Potassium chloride"), ("20 mEq", "40 mEq"), ("po",),
     ("qd", "bid"), ("hypok",)),
    (("lorazepam", "Ativan", "Lorazepam"), ("0.5 mg", "1 mg"), ("po", "iv"), ("q6h", "prn"),
     ("anxiety", "seizure")),
    (("ciprofloxacin", "cipro", "Ciprofloxacin"), ("250 mg", "500 mg"), ("po",), ("bid",),
     ("uti",)),
    (("doxycycline", "doxy", "Doxycycline"), ("100 mg",), ("po",), ("bid",), ("pna",)),
    (("enoxaparin", "Lovenox", "Enoxaparin"), ("40 mg", "80 mg"), ("sc",), ("qd", "q12h"),
     ("dvt", "pe")),
    (("nitroglycerin", "NTG", "Nitroglycerin"), ("0.4 mg",), ("sl",), ("prn",), ("cp",)),
    (("losartan", "losartan", "Losartan"), ("25 mg", "50 mg", "100 mg"), ("po",), ("qd",),
     ("htn", "ckd")),
    (("fluoxetine", "Prozac", "Fluoxetine"), ("20 mg", "40 mg"), ("po",), ("qd",), ("mdd",)),
    (("melatonin", "melatonin", "Melatonin"), ("3 mg", "5 mg"), ("po",), ("qhs",),
     ("insomnia",)),
    (("hydrocortisone cream", "HC cream", "Hydrocortisone cream"), ("1%",), ("top",),
     ("bid",), ("eczema",)),
    (("levetiracetam", "Keppra", "Levetiracetam"), ("500 mg", "750 mg"), ("po",), ("bid",),
     ("seizure",)),
    (("ferrous sulfate", ("FeSO4", "iron"), "Ferrous sulfate"), ("325 mg",), ("po",), ("qd",),
     ("anemia",)),
    (("pantoprazole", "Protonix", "Pantoprazole"), ("40 mg",), ("iv", "po"), ("qd", "bid"),
     ("gerd", "bleed")),
)
# Treatments: (forms, takes a body location).
TREATMENTS = (
    (("physical therapy", "PT", "Physical therapy"), True),
    (("cardiac catheterization", "cath", "Cardiac catheterization"), False),
    (("appendectomy", "appy", "Laparoscopic appendectomy"), False),
    (("dialysis", "HD", "Hemodialysis"), False),
    (("intubation", "ETT", "Endotracheal intubation"), False),
    (("blood transfusion", "PRBC", "Transfusion of packed red blood cells"), False),
    (("IV fluids", "IVF", "Intravenous fluid resuscitation"), False),
    (("supplemental oxygen", "O2", "Supplemental oxygen"), False),
    (("bypass surgery", "CABG", "Coronary artery bypass grafting"), False),
    (("stent placement", "PCI", "Percutaneous coronary intervention"), False),
    (("gallbladder surgery", "lap chole", "Laparoscopic cholecystectomy"), False),
    (("knee replacement", "TKA", "Total knee arthroplasty"), False),
    (("hip replacement", "THA", "Total hip arthroplasty"), False),
    (("wound care", "wound care", "Wound care"), True),
    (("splinting", "splint", "Splint application"), True),
    (("incision and drainage", "I&D", "Incision and drainage"), True),
    (("cardioversion", "DCCV", "Electrical cardioversion"), False),
    (("chemotherapy", "chemo", "Chemotherapy"), False),
    (("radiation therapy", "XRT", "Radiation therapy"), False),
    (("steroid injection", "steroid inj", "Corticosteroid injection"), True),
    (("CPAP", "CPAP", "CPAP therapy"), False),
    (("smoking cessation counseling", "smoking cessation", "Tobacco cessation counseling"),
     False),
    (("colectomy", "colectomy", "Partial colectomy"), False),
    (("thrombectomy", "thrombectomy", "Mechanical thrombectomy"), False),
    (("cast placement", "cast", "Cast application"), True),
    (("talk therapy", "CBT", "Cognitive behavioral therapy"), False),
    (("pacemaker placement", "PPM", "Permanent pacemaker placement"), False),
)
SEVERITIES = (("mild", "moderate", "severe", "worsening", "significant", "acute", "chronic"),
              ("mild", "mod", "sev", "worse", "acute", "chronic", "severe"),
              ("mild", "moderate", "severe", "acute on chronic", "uncontrolled", "stable"))
NEGATIONS = (("denies", "no", "no evidence of", "negative for", "without", "free of"),
             ("no", "denies", "neg", "neg for", "-"),
             ("No", "Negative for", "without", "ruled out"))
TEMPORALS = (
    ("yesterday", "this morning", "last night", "two days ago", "three days ago", "last week",
     "on admission", "in 2019", "last month", "overnight", "earlier today", "a year ago",
     "two weeks ago", "in the emergency department"),
    ("today", "yest", "2d ago", "3d ago", "1wk ago", "on adm", "2019", "last mo", "this AM",
     "overnight", "in ED", "x2d"),
    ("on admission", "at discharge", "prior to admission", "on hospital day 2",
     "on hospital day 3", "in 2018", "postoperatively"),
)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 10: "ten",
                14: "fourteen"}
DURATIONS = ((3, "day"), (5, "day"), (7, "day"), (10, "day"), (14, "day"), (2, "week"),
             (4, "week"), (6, "week"), (3, "month"), (6, "month"))
SUBJECTS = ("The patient", "He", "She")


def _stable_seed(*parts: object) -> int:
  """A seed independent of PYTHONHASHSEED and process: sha256 of the parts."""
  key = "\x1f".join(str(p) for p in parts).encode("utf-8")
  return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


class _Note:
  """Appends text and mentions, recording offsets as it goes; can roll back a clause."""

  def __init__(self):
    self.parts: list[str] = []
    self.n = 0
    self.entities: list[Entity] = []
    self.relations: list[Relation] = []

  def add(self, s: str) -> None:
    self.parts.append(s)
    self.n += len(s)

  def ent(self, s: str, etype: str) -> str:
    start = self.n
    self.add(s)
    eid = f"T{len(self.entities) + 1}"
    self.entities.append(Entity(eid, start, self.n, etype, s))
    return eid

  def rel(self, head: str, tail: str, rtype: str) -> None:
    self.relations.append(Relation(head, tail, rtype, f"R{len(self.relations) + 1}"))

  def mark(self) -> tuple[int, int, int, int]:
    return len(self.parts), self.n, len(self.entities), len(self.relations)

  def reset(self, mark: tuple[int, int, int, int]) -> None:
    p, self.n, e, r = mark
    del self.parts[p:], self.entities[e:], self.relations[r:]

  def text(self) -> str:
    return "".join(self.parts)


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _bare(s: str) -> str:
  """'a heart attack' -> 'heart attack', for forms written after a severity word."""
  for article in ("a ", "an "):
    if s.startswith(article):
      return s[len(article):]
  return s


class _Writer:
  """Writes clauses of one style; `st` indexes the (narrative, telegraphic, discharge) forms."""

  def __init__(self, style: str, rng: random.Random):
    self.style, self.st, self.rng = style, STYLES.index(style), rng

  # -- small helpers
  def chance(self, p: float) -> bool:
    return self.rng.random() < p

  def pick(self, seq):
    return seq[self.rng.randrange(len(seq))]

  def form(self, forms) -> str:
    f = forms[self.st]
    return f if isinstance(f, str) else self.pick(f)

  def problem(self, b: _Note, key: str | None = None, cap: bool = False,
              bare: bool = False) -> str:
    key = key or self.pick(tuple(PROBLEMS))
    s = self.form(PROBLEMS[key])
    s = _bare(s) if bare else s
    return b.ent(_cap(s) if cap else s, "problem")

  def mod(self, b: _Note, head: str, s: str, etype: str) -> str:
    tail = b.ent(s, etype)
    b.rel(head, tail, etype)
    return tail

  def severity(self) -> str:
    return self.pick(SEVERITIES[self.st])

  def temporal(self, b: _Note, head: str) -> None:
    """Writes ' <temporal>' (a date for some styles) linked to `head`."""
    if self.st == 2 and self.chance(0.5):
      b.add(" on ")
      date = (f"{self.rng.randint(1, 12):02d}/{self.rng.randint(1, 28):02d}/"
              f"{self.rng.randint(2015, 2023)}")
      self.mod(b, head, date, "temporal")
      return
    if self.st == 1 and self.chance(0.3):
      b.add(" ")
      self.mod(b, head, f"{self.rng.randint(1, 12)}/{self.rng.randint(1, 28)}", "temporal")
      return
    b.add(" ")
    self.mod(b, head, self.pick(TEMPORALS[self.st]), "temporal")

  def duration(self) -> str:
    n, unit = self.pick(DURATIONS)
    if self.st == 1:
      return f"{n}{unit[0]}" if unit != "month" else f"{n}mo"
    if self.st == 0 and n in NUMBER_WORDS and self.chance(0.5):
      return f"{NUMBER_WORDS[n]} {unit}s"
    return f"{n} {unit}s"

  def bodyloc(self, b: _Note, head: str, table=BODYLOCS) -> None:
    self.mod(b, head, self.form(self.pick(table)), "bodyloc")

  def lab_value(self, lab) -> str:
    _, unit, lo, hi, dec = lab
    if unit == "mmHg":
      sys_ = self.rng.randint(int(lo), int(hi))
      v = f"{sys_}/{self.rng.randint(max(40, sys_ // 2 - 10), sys_ // 2 + 25)}"
    else:
      v = f"{self.rng.uniform(lo, hi):.{dec}f}"
    if not unit or (self.st == 1 and self.chance(0.7)):
      return v
    return f"{v}{unit}" if unit == "%" else f"{v} {unit}"

  # -- clauses: each writes one sentence / line / section (without the separator)
  def clause_problem(self, b: _Note) -> None:
    r, st = self.rng, self.st
    if st == 0:
      t = r.randrange(4)
      if t == 0:
        b.add(f"{self.pick(SUBJECTS)} presented with ")
        if self.chance(0.5):
          sev = b.ent(self.severity(), "severity")
          b.add(" ")
          p = self.problem(b, bare=True)
          b.rel(p, sev, "severity")
        else:
          p = self.problem(b)
        if self.chance(0.7):
          self.temporal(b, p)
      elif t == 1:
        b.add(f"{self.pick(SUBJECTS)} has a history of ")
        p = self.problem(b)
        if self.chance(0.5):
          b.add(" diagnosed")
          self.temporal(b, p)
        if self.chance(0.4):
          b.add(" and ")
          self.problem(b)
      elif t == 2:
        b.add(f"{self.pick(SUBJECTS)} reports ")
        p = self.problem(b)
        b.add(" for the past ")
        self.mod(b, p, self.duration(), "duration")
      else:
        b.add("Her course was complicated by " if self.chance(0.5) else
              "His course was complicated by ")
        p = self.problem(b)
        if self.chance(0.5):
          self.temporal(b, p)
      b.add(".")
    elif st == 1:
      if self.chance(0.4):
        b.add(self.pick(("c/o ", "hx ", "PMH: ", "A: ")))
      if self.chance(0.4):
        sev = b.ent(self.severity(), "severity")
        b.add(" ")
        p = self.problem(b)
        b.rel(p, sev, "severity")
      else:
        p = self.problem(b)
      if self.chance(0.5):
        b.add(" x")
        self.mod(b, p, self.duration(), "duration")
      elif self.chance(0.4):
        self.temporal(b, p)
      if self.chance(0.3):
        b.add(", ")
        self.problem(b)
    else:
      b.add(self.pick(("Discharge diagnosis: ", "Principal diagnosis: ", "Diagnoses: ",
                       "Past medical history: ", "Problem list: ")))
      for i in range(r.randint(1, 3)):
        if i:
          b.add(" ")
        b.add(f"{i + 1}. ")
        p = self.problem(b, cap=True)
        if self.chance(0.35):
          b.add(", ")
          self.mod(b, p, self.severity(), "severity")
        elif self.chance(0.2):
          b.add(", diagnosed")
          self.temporal(b, p)
        b.add(".")

  def clause_local(self, b: _Note) -> None:
    st = self.st
    forms = LOCAL_PROBLEMS[self.pick(tuple(LOCAL_PROBLEMS))]
    if st == 0:
      b.add(f"{self.pick(SUBJECTS)} {self.pick(('complains of', 'was found to have', 'notes'))} ")
      sev = b.ent(self.severity(), "severity") if self.chance(0.4) else None
      if sev:
        b.add(" ")
      p = b.ent(_bare(self.form(forms)) if sev else self.form(forms), "problem")
      if sev:
        b.rel(p, sev, "severity")
      b.add(self.pick((" in the ", " of the ", " over the ")))
      self.bodyloc(b, p)
      if self.chance(0.4):
        b.add(" for ")
        self.mod(b, p, self.duration(), "duration")
      b.add(".")
    elif st == 1:
      loc = b.ent(self.form(self.pick(BODYLOCS)), "bodyloc")
      b.add(" ")
      p = b.ent(self.form(forms), "problem")
      b.rel(p, loc, "bodyloc")
      if self.chance(0.5):
        b.add(" x")
        self.mod(b, p, self.duration(), "duration")
      if self.chance(0.3):
        b.add(", ")
        self.mod(b, p, self.severity(), "severity")
    else:
      b.add(self.pick(("Diagnosis: ", "Secondary diagnosis: ", "Wound assessment: ")))
      p = b.ent(_cap(self.form(forms)), "problem")
      b.add(" of the ")
      self.bodyloc(b, p)
      if self.chance(0.4):
        b.add(", ")
        self.mod(b, p, self.severity(), "severity")
      b.add(".")

  def clause_negation(self, b: _Note) -> None:
    st = self.st
    keys = self.rng.sample(sorted(PROBLEMS), self.rng.randint(1, 3))
    if st == 0:
      cue = self.pick(NEGATIONS[0])
      subj = self.pick(SUBJECTS)
      b.add({"denies": f"{subj} ", "no": self.pick(("There was ", "Exam showed ")),
             "no evidence of": "There was ", "negative for": "Workup was ",
             "without": f"{subj} presented ", "free of": f"{subj} has been "}[cue])
      neg = b.ent(cue, "negation")
      sep = (", ", " or ")
    elif st == 1:
      neg = b.ent(self.pick(NEGATIONS[1]), "negation")
      sep = (self.pick(("/", ", ")),) * 2
    else:
      cue = self.pick(NEGATIONS[2])
      b.add("Review of systems: ")
      if cue == "ruled out":
        p = self.problem(b, keys[0], cap=True)
        b.add(" ")
        self.mod(b, p, cue, "negation")
        b.add(".")
        return
      if cue == "without":
        b.add("Patient ")
      neg = b.ent(cue, "negation")
      sep = (", ", " and ")
    b.add(" ")
    for i, k in enumerate(keys):
      if i:
        b.add(sep[1] if i == len(keys) - 1 else sep[0])
      p = self.problem(b, k)
      b.rel(p, neg, "negation")
    if st != 1:
      b.add(".")

  def clause_lab(self, b: _Note) -> None:
    labs = self.rng.sample(LABS, self.rng.randint(1, 3 if self.st else 2))
    if self.st == 0:
      for i, lab in enumerate(labs):
        if i:
          b.add(" and ")
        b.add("Her " if i == 0 and self.chance(0.5) else "the " if i else "The ")
        t = b.ent(self.form(lab[0]), "test")
        b.add(self.pick((" was ", " came back at ", " measured ")))
        self.mod(b, t, self.lab_value(lab), "labvalue")
        if i == 0 and self.chance(0.4):
          self.temporal(b, t)
      b.add(".")
    else:
      if self.st == 2:
        b.add(self.pick(("Labs: ", "Pertinent results: ", "Results: ")))
      elif self.chance(0.3):
        b.add("labs: ")
      for i, lab in enumerate(labs):
        if i:
          b.add(", ")
        t = b.ent(self.form(lab[0]), "test")
        b.add(" " if self.st == 1 else self.pick((" ", ": ")))
        self.mod(b, t, self.lab_value(lab), "labvalue")
      if self.st == 2:
        if self.chance(0.3):
          b.add(",")
          self.temporal(b, t)
        b.add(".")

  def clause_imaging(self, b: _Note) -> None:
    modality = self.form(self.pick(IMAGING))
    locs, findings = self.pick(IMAGING_SITES)
    loc = self.form(locs)
    finding = self.pick(findings)
    negated = self.chance(0.35)
    if self.st == 0:
      b.add(self.pick(("The ", "A repeat ", "Her ")))
      t = b.ent(modality, "test")
      b.add(" of the ")
      self.mod(b, t, loc, "bodyloc")
      if self.chance(0.3):
        self.temporal(b, t)
      if negated:
        b.add(" showed ")
        neg = b.ent(self.pick(("no", "no evidence of")), "negation")
        b.add(" ")
      else:
        b.add(self.pick((" showed ", " revealed ", " was concerning for ")))
      p = self.problem(b, finding)
    else:
      if self.st == 2:
        b.add("Imaging: ")
        t = b.ent(modality, "test")
        b.add(" ")
        self.mod(b, t, loc, "bodyloc")
        if self.chance(0.3):
          self.temporal(b, t)
        b.add(": ")
      else:
        t = b.ent(modality, "test")
        b.add(" ")
        self.mod(b, t, loc, "bodyloc")
        b.add(self.pick((": ", " - ", " w/ ")))
      if negated:
        neg = b.ent(self.pick(("no", "neg for")) if self.st == 1 else "Negative for", "negation")
        b.add(" ")
      p = self.problem(b, finding)
    if negated:
      b.rel(p, neg, "negation")
    if self.st != 1:
      b.add(".")

  def clause_test(self, b: _Note) -> None:
    forms, findings = self.pick(TESTS)
    name = self.form(forms)
    result = self.rng.random()
    if self.st == 0:
      b.add(self.pick(("The ", "A repeat ", "Her ")))
      t = b.ent(name, "test")
      if self.chance(0.4):
        self.temporal(b, t)
      if result < 0.3:
        b.add(self.pick((" was unremarkable.", " was normal.", " was pending.")))
        return
      if result < 0.55:
        b.add(self.pick((" showed ", " demonstrated ")))
        neg = b.ent("no", "negation")
        b.add(" ")
        p = self.problem(b, self.pick(findings))
        b.rel(p, neg, "negation")
      else:
        b.add(self.pick((" showed ", " was consistent with ", " demonstrated ")))
        self.problem(b, self.pick(findings))
      b.add(".")
    elif self.st == 1:
      t = b.ent(name, "test")
      if self.chance(0.3):
        self.temporal(b, t)
      if result < 0.3:
        b.add(self.pick((" nl", " WNL", " pending", " neg")))
        return
      b.add(self.pick((": ", " c/w ", " + ")))
      if result < 0.55:
        neg = b.ent("no", "negation")
        b.add(" ")
        p = self.problem(b, self.pick(findings))
        b.rel(p, neg, "negation")
      else:
        self.problem(b, self.pick(findings))
    else:
      b.add("Studies: ")
      t = b.ent(name, "test")
      if self.chance(0.3):
        self.temporal(b, t)
      if result < 0.3:
        b.add(self.pick((": within normal limits.", ": normal.", ": no acute findings.")))
        return
      b.add(": ")
      if result < 0.55:
        neg = b.ent("Negative for", "negation")
        b.add(" ")
        p = self.problem(b, self.pick(findings))
        b.rel(p, neg, "negation")
      else:
        self.problem(b, self.pick(findings), cap=True)
      b.add(".")

  def _dose_route_freq(self, b: _Note, d: str, drug, route_p: float, freq_p: float) -> None:
    """Writes ' <dosage> [<route>] [<frequency>]' linked to drug `d`."""
    _, doses, routes, freqs, _ = drug
    dose = self.pick(doses)
    if self.st == 1 and " " in dose:
      num, unit = dose.split(" ")
      dose = num + {"units": "u", "puffs": " puffs"}.get(unit, unit)
    b.add(" ")
    self.mod(b, d, dose, "dosage")
    if self.chance(route_p):
      b.add(" ")
      self.mod(b, d, self.form(ROUTES[self.pick(routes)]), "route")
    if self.chance(freq_p):
      b.add(" ")
      self.mod(b, d, self.form(FREQS[self.pick(freqs)]), "frequency")

  def clause_drug(self, b: _Note) -> None:
    drug = self.pick(DRUGS)
    name, indications = self.form(drug[0]), drug[4]
    if self.st == 0:
      t = self.rng.randrange(5)
      subj = self.pick(SUBJECTS)
      if t == 0:
        b.add(f"{subj} was started on ")
        d = b.ent(name, "drug")
        self._dose_route_freq(b, d, drug, 0.5, 0.9)
        b.add(" for ")
        self.problem(b, self.pick(indications))
      elif t == 1:
        b.add(f"{subj} takes ")
        d = b.ent(name, "drug")
        self._dose_route_freq(b, d, drug, 0.2, 0.9)
        b.add(" at home")
      elif t == 2:
        b.add(f"{subj} received ")
        d = b.ent(name, "drug")
        self._dose_route_freq(b, d, drug, 0.8, 0.0)
        self.temporal(b, d)
      elif t == 3:
        b.add(f"{subj} will continue ")
        d = b.ent(name, "drug")
        self._dose_route_freq(b, d, drug, 0.3, 0.8)
        b.add(" for ")
        self.mod(b, d, self.duration(), "duration")
      else:
        d = b.ent(_cap(name), "drug")
        b.add(" was increased to")
        self._dose_route_freq(b, d, drug, 0.0, 0.7)
      b.add(".")
    elif self.st == 1:
      t = self.rng.randrange(5)
      if t == 0:
        self.problem(b, self.pick(indications))
        b.add(self.pick((" - ", ": ", " -> ")))
      elif t == 1:
        b.add(self.pick(("start ", "cont ", "rx ", "incr ")))
      elif t == 2:
        d = b.ent(name, "drug")
        b.add(self.pick((" d/c'd", " held", " stopped")))
        if self.chance(0.5):
          self.temporal(b, d)
        return
      d = b.ent(name, "drug")
      self._dose_route_freq(b, d, drug, 0.8, 0.9)
      if self.chance(0.35):
        b.add(" x")
        self.mod(b, d, self.duration(), "duration")
      elif t == 4 and self.chance(0.5):
        b.add(" given")
        self.temporal(b, d)
    else:
      b.add(self.pick(("Discharge medications: ", "Medications on admission: ",
                       "New medications: ")))
      for i, drug in enumerate(self.rng.sample(DRUGS, self.rng.randint(1, 3))):
        if i:
          b.add("; ")
        d = b.ent(self.form(drug[0]), "drug")
        self._dose_route_freq(b, d, drug, 0.7, 0.95)
        if self.chance(0.25):
          b.add(" for ")
          self.mod(b, d, self.duration(), "duration")
      b.add(".")

  def clause_treatment(self, b: _Note) -> None:
    forms, local = self.pick(TREATMENTS)
    name = self.form(forms)
    if self.st == 0:
      t = self.rng.randrange(3)
      b.add(f"{self.pick(SUBJECTS)} "
            f"{('underwent', 'was treated with', 'was referred for')[t]} ")
      x = b.ent(name, "treatment")
      if local and self.chance(0.7):
        b.add(" to the ")
        self.bodyloc(b, x)
      if t == 2 and self.chance(0.6):
        b.add(" for ")
        self.mod(b, x, self.duration(), "duration")
      elif self.chance(0.6):
        self.temporal(b, x)
      b.add(".")
    elif self.st == 1:
      b.add(self.pick(("s/p ", "plan ", "needs ", "")))
      x = b.ent(name, "treatment")
      if local and self.chance(0.7):
        b.add(" ")
        self.bodyloc(b, x)
      if self.chance(0.5):
        self.temporal(b, x)
    else:
      b.add(self.pick(("Procedures: ", "Procedure: ", "Hospital course: ", "Plan: ")))
      x = b.ent(_cap(name), "treatment")
      if local and self.chance(0.7):
        b.add(" to the ")
        self.bodyloc(b, x)
      if self.chance(0.7):
        self.temporal(b, x)
      elif self.chance(0.4):
        b.add(" for ")
        self.mod(b, x, self.duration(), "duration")
      b.add(".")


def _clause_separator(style: str, rng: random.Random) -> str:
  if style == "narrative":
    return " "
  if style == "discharge":
    return "\n"
  return rng.choice(("; ", ". ", "\n"))


def _note(writer: _Writer, mix: Mapping[str, float]) -> _Note:
  """One note of 1-4 clauses, stopping early rather than exceeding MAX_CHARS."""
  rng, style = writer.rng, writer.style
  kinds = [k for k in KINDS if mix.get(k, 0) > 0]
  weights = [mix[k] for k in kinds]
  count = rng.choices((1, 2, 3, 4), weights=CLAUSES_PER_NOTE[style])[0]
  sep = _clause_separator(style, rng)
  b = _Note()
  for i in range(count):
    mark = b.mark()
    if i:
      b.add(sep)
    getattr(writer, f"clause_{rng.choices(kinds, weights=weights)[0]}")(b)
    if b.n > MAX_CHARS and i:
      b.reset(mark)
      break
  return b


def make_site(name: str, style: str, num_docs: int, seed: int = DEFAULT_SEED,
              split: str = "train", exclude: Collection[str] = (),
              mix: Mapping[str, float] | None = None) -> Corpus:
  """`num_docs` distinct notes of one site in one style, none of whose texts is in `exclude`.

  `mix` overrides the style's clause-kind weights (see STYLE_MIX), i.e. the label mix.
  Deterministic in (name, style, num_docs, seed, split, exclude, mix).
  """
  if style not in STYLES:
    raise ValueError(f"unknown synthetic style {style!r}; known: {', '.join(STYLES)}")
  mix = dict(STYLE_MIX[style] if mix is None else mix)
  unknown = set(mix) - set(KINDS)
  if unknown or not any(v > 0 for v in mix.values()):
    raise ValueError(f"bad clause mix {mix!r}; kinds: {', '.join(KINDS)}")
  writer = _Writer(style, random.Random(_stable_seed(seed, name, style, split)))
  seen = set(exclude)
  docs: list[Document] = []
  attempts = 0
  while len(docs) < num_docs:
    attempts += 1
    if attempts > 100 * num_docs + 1000:
      raise ValueError(f"synthetic site {name!r}: cannot find {num_docs} distinct notes")
    b = _note(writer, mix)
    text = b.text()
    if text in seen:
      continue
    seen.add(text)
    i = len(docs)
    doc = Document(id=f"{name}-{split}-{i:04d}", text=text, entities=tuple(b.entities),
                   relations=tuple(b.relations), source=f"synthetic:{name}", line=i + 1,
                   meta={"site": name, "style": style})
    validate_document(doc, ENTITY_TYPES, RELATION_TYPES)
    docs.append(doc)
  return Corpus(f"synthetic/{name}", split, docs)


def site_names(num_sites: int = len(DEFAULT_SITES)) -> list[tuple[str, str]]:
  """(name, style) of each site; beyond the defaults the styles repeat with a numeric suffix."""
  out = []
  for i in range(num_sites):
    name, style = DEFAULT_SITES[i % len(DEFAULT_SITES)]
    out.append((name if i < len(DEFAULT_SITES) else f"{name}_{i // len(DEFAULT_SITES) + 1}",
                style))
  return out


def synthetic_sites(num_sites: int = len(DEFAULT_SITES),
                    docs_per_site: Sequence = DEFAULT_DOCS_PER_SITE,
                    seed: int = DEFAULT_SEED) -> dict[str, dict[str, Corpus]]:
  """{site: {"train"|"dev"|"test": Corpus}}; no text appears twice across sites and splits.

  `docs_per_site` is one (train, dev, test) triple for every site, or a sequence of
  triples used per site in turn (cycled when there are more sites than triples).
  """
  if num_sites < 1:
    raise ValueError(f"num_sites must be >= 1, got {num_sites}")
  sizes = [tuple(docs_per_site)] if isinstance(docs_per_site[0], int) else \
      [tuple(t) for t in docs_per_site]
  for t in sizes:
    if len(t) != len(SPLITS) or any(n < 0 for n in t):
      raise ValueError(f"docs_per_site entries must be (train, dev, test) counts, got {t!r}")
  seen: set[str] = set()
  out: dict[str, dict[str, Corpus]] = {}
  for i, (name, style) in enumerate(site_names(num_sites)):
    out[name] = {}
    for split, n in zip(SPLITS, sizes[i % len(sizes)]):
      corpus = make_site(name, style, n, seed, split=split, exclude=seen)
      seen.update(d.text for d in corpus.documents)
      out[name][split] = corpus
  return out
