"""The clause grammar of the synthetic notes: one writer per named style, offsets as it writes.

`Writer` writes one clause of a kind (tables.KINDS) in its `Style`: each style has its own
sentence shapes (narrative sentences, telegraphic shorthand, templated discharge sections) and
takes its own column of every lexicon entry. `write_note` strings 1-4 clauses into a `Note`.
Every random choice comes from the writer's `rng`, in the order the code makes them, so the
same seed writes the same text; reordering any draw changes every corpus.
"""

from __future__ import annotations

import enum
import random
from typing import Mapping

from fedjax_lora.data.records import Entity, Relation
from fedjax_lora.data.synthetic.tables import (BODYLOCS, CLAUSES_PER_NOTE, DRUGS, DURATIONS, FREQS,
                                               IMAGING, IMAGING_SITES, KINDS, LABS,
                                               LOCAL_PROBLEMS, MAX_CHARS, NEGATIONS,
                                               NUMBER_WORDS, PROBLEMS, ROUTES, SEVERITIES,
                                               STYLES, SUBJECTS, TEMPORALS, TESTS, TREATMENTS)


class Style(enum.Enum):
  """A site's writing style; the value is its name in STYLES, STYLE_MIX and a site's meta."""
  NARRATIVE = "narrative"      # full sentences: "The patient presented with ..."
  TELEGRAPHIC = "telegraphic"  # clinic shorthand: "c/o SOB x3d"
  DISCHARGE = "discharge"      # templated sections: "Discharge diagnosis: 1. ..."

  @property
  def column(self) -> int:
    """The position of this style's form in every per-style table entry."""
    return STYLES.index(self.value)


assert tuple(s.value for s in Style) == STYLES


class Note:
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


class Writer:
  """Writes clauses of one named style, drawing every choice from `rng` in a fixed order."""

  def __init__(self, style: Style, rng: random.Random):
    self.style, self.rng = style, rng
    self._column = style.column

  # -- small helpers
  def chance(self, p: float) -> bool:
    return self.rng.random() < p

  def pick(self, seq):
    return seq[self.rng.randrange(len(seq))]

  def of(self, entry):
    """This style's item of a per-style entry (narrative, telegraphic, discharge)."""
    return entry[self._column]

  def form(self, forms) -> str:
    f = self.of(forms)
    return f if isinstance(f, str) else self.pick(f)

  def problem(self, b: Note, key: str | None = None, cap: bool = False,
              bare: bool = False) -> str:
    key = key or self.pick(tuple(PROBLEMS))
    s = self.form(PROBLEMS[key])
    s = _bare(s) if bare else s
    return b.ent(_cap(s) if cap else s, "problem")

  def mod(self, b: Note, head: str, s: str, etype: str) -> str:
    tail = b.ent(s, etype)
    b.rel(head, tail, etype)
    return tail

  def severity(self) -> str:
    return self.pick(self.of(SEVERITIES))

  def temporal(self, b: Note, head: str) -> None:
    """Writes ' <temporal>' (a date for some styles) linked to `head`."""
    if self.style is Style.DISCHARGE and self.chance(0.5):
      b.add(" on ")
      date = (f"{self.rng.randint(1, 12):02d}/{self.rng.randint(1, 28):02d}/"
              f"{self.rng.randint(2015, 2023)}")
      self.mod(b, head, date, "temporal")
      return
    if self.style is Style.TELEGRAPHIC and self.chance(0.3):
      b.add(" ")
      self.mod(b, head, f"{self.rng.randint(1, 12)}/{self.rng.randint(1, 28)}", "temporal")
      return
    b.add(" ")
    self.mod(b, head, self.pick(self.of(TEMPORALS)), "temporal")

  def duration(self) -> str:
    n, unit = self.pick(DURATIONS)
    if self.style is Style.TELEGRAPHIC:
      return f"{n}{unit[0]}" if unit != "month" else f"{n}mo"
    if self.style is Style.NARRATIVE and n in NUMBER_WORDS and self.chance(0.5):
      return f"{NUMBER_WORDS[n]} {unit}s"
    return f"{n} {unit}s"

  def bodyloc(self, b: Note, head: str, table=BODYLOCS) -> None:
    self.mod(b, head, self.form(self.pick(table)), "bodyloc")

  def lab_value(self, lab) -> str:
    _, unit, lo, hi, dec = lab
    if unit == "mmHg":
      sys_ = self.rng.randint(int(lo), int(hi))
      v = f"{sys_}/{self.rng.randint(max(40, sys_ // 2 - 10), sys_ // 2 + 25)}"
    else:
      v = f"{self.rng.uniform(lo, hi):.{dec}f}"
    if not unit or (self.style is Style.TELEGRAPHIC and self.chance(0.7)):
      return v
    return f"{v}{unit}" if unit == "%" else f"{v} {unit}"

  # -- clauses: each writes one sentence / line / section (without the separator)
  def clause_problem(self, b: Note) -> None:
    r = self.rng
    if self.style is Style.NARRATIVE:
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
    elif self.style is Style.TELEGRAPHIC:
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
    else:  # Style.DISCHARGE
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

  def clause_local(self, b: Note) -> None:
    forms = LOCAL_PROBLEMS[self.pick(tuple(LOCAL_PROBLEMS))]
    if self.style is Style.NARRATIVE:
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
    elif self.style is Style.TELEGRAPHIC:
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
    else:  # Style.DISCHARGE
      b.add(self.pick(("Diagnosis: ", "Secondary diagnosis: ", "Wound assessment: ")))
      p = b.ent(_cap(self.form(forms)), "problem")
      b.add(" of the ")
      self.bodyloc(b, p)
      if self.chance(0.4):
        b.add(", ")
        self.mod(b, p, self.severity(), "severity")
      b.add(".")

  def clause_negation(self, b: Note) -> None:
    keys = self.rng.sample(sorted(PROBLEMS), self.rng.randint(1, 3))
    if self.style is Style.NARRATIVE:
      cue = self.pick(self.of(NEGATIONS))
      subj = self.pick(SUBJECTS)
      b.add({"denies": f"{subj} ", "no": self.pick(("There was ", "Exam showed ")),
             "no evidence of": "There was ", "negative for": "Workup was ",
             "without": f"{subj} presented ", "free of": f"{subj} has been "}[cue])
      neg = b.ent(cue, "negation")
      sep = (", ", " or ")
    elif self.style is Style.TELEGRAPHIC:
      neg = b.ent(self.pick(self.of(NEGATIONS)), "negation")
      sep = (self.pick(("/", ", ")),) * 2
    else:  # Style.DISCHARGE
      cue = self.pick(self.of(NEGATIONS))
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
    if self.style is not Style.TELEGRAPHIC:
      b.add(".")

  def clause_lab(self, b: Note) -> None:
    most = 2 if self.style is Style.NARRATIVE else 3
    labs = self.rng.sample(LABS, self.rng.randint(1, most))
    if self.style is Style.NARRATIVE:
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
    else:  # Style.TELEGRAPHIC or Style.DISCHARGE
      if self.style is Style.DISCHARGE:
        b.add(self.pick(("Labs: ", "Pertinent results: ", "Results: ")))
      elif self.chance(0.3):
        b.add("labs: ")
      for i, lab in enumerate(labs):
        if i:
          b.add(", ")
        t = b.ent(self.form(lab[0]), "test")
        b.add(" " if self.style is Style.TELEGRAPHIC else self.pick((" ", ": ")))
        self.mod(b, t, self.lab_value(lab), "labvalue")
      if self.style is Style.DISCHARGE:
        if self.chance(0.3):
          b.add(",")
          self.temporal(b, t)
        b.add(".")

  def clause_imaging(self, b: Note) -> None:
    modality = self.form(self.pick(IMAGING))
    locs, findings = self.pick(IMAGING_SITES)
    loc = self.form(locs)
    finding = self.pick(findings)
    negated = self.chance(0.35)
    if self.style is Style.NARRATIVE:
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
    else:  # Style.TELEGRAPHIC or Style.DISCHARGE
      if self.style is Style.DISCHARGE:
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
        cue = self.pick(("no", "neg for")) if self.style is Style.TELEGRAPHIC else "Negative for"
        neg = b.ent(cue, "negation")
        b.add(" ")
      p = self.problem(b, finding)
    if negated:
      b.rel(p, neg, "negation")
    if self.style is not Style.TELEGRAPHIC:
      b.add(".")

  def clause_test(self, b: Note) -> None:
    forms, findings = self.pick(TESTS)
    name = self.form(forms)
    result = self.rng.random()
    if self.style is Style.NARRATIVE:
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
    elif self.style is Style.TELEGRAPHIC:
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
    else:  # Style.DISCHARGE
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

  def _dose_route_freq(self, b: Note, d: str, drug, route_p: float, freq_p: float) -> None:
    """Writes ' <dosage> [<route>] [<frequency>]' linked to drug `d`."""
    _, doses, routes, freqs, _ = drug
    dose = self.pick(doses)
    if self.style is Style.TELEGRAPHIC and " " in dose:
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

  def clause_drug(self, b: Note) -> None:
    drug = self.pick(DRUGS)
    name, indications = self.form(drug[0]), drug[4]
    if self.style is Style.NARRATIVE:
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
    elif self.style is Style.TELEGRAPHIC:
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
    else:  # Style.DISCHARGE
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

  def clause_treatment(self, b: Note) -> None:
    forms, local = self.pick(TREATMENTS)
    name = self.form(forms)
    if self.style is Style.NARRATIVE:
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
    elif self.style is Style.TELEGRAPHIC:
      b.add(self.pick(("s/p ", "plan ", "needs ", "")))
      x = b.ent(name, "treatment")
      if local and self.chance(0.7):
        b.add(" ")
        self.bodyloc(b, x)
      if self.chance(0.5):
        self.temporal(b, x)
    else:  # Style.DISCHARGE
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


# The clause writer of each kind (tables.KINDS), as STYLE_MIX and `mix` name them.
CLAUSES = {"problem": Writer.clause_problem, "local": Writer.clause_local,
           "negation": Writer.clause_negation, "lab": Writer.clause_lab,
           "imaging": Writer.clause_imaging, "test": Writer.clause_test,
           "drug": Writer.clause_drug, "treatment": Writer.clause_treatment}
assert tuple(CLAUSES) == KINDS


def _clause_separator(style: Style, rng: random.Random) -> str:
  if style is Style.NARRATIVE:
    return " "
  if style is Style.DISCHARGE:
    return "\n"
  return rng.choice(("; ", ". ", "\n"))


def write_note(writer: Writer, mix: Mapping[str, float]) -> Note:
  """One note of 1-4 clauses, stopping early rather than exceeding MAX_CHARS."""
  rng, style = writer.rng, writer.style
  kinds = [k for k in KINDS if mix.get(k, 0) > 0]
  weights = [mix[k] for k in kinds]
  count = rng.choices((1, 2, 3, 4), weights=CLAUSES_PER_NOTE[style.value])[0]
  sep = _clause_separator(style, rng)
  b = Note()
  for i in range(count):
    mark = b.mark()
    if i:
      b.add(sep)
    CLAUSES[rng.choices(kinds, weights=weights)[0]](writer, b)
    if b.n > MAX_CHARS and i:
      b.reset(mark)
      break
  return b
