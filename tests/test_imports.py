"""The project's modules form no import cycle (read statically, every import in a file)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedjax_lora", "models", "launch")


def _modules() -> dict[str, Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
  """The project modules `name` imports anywhere in its file (TYPE_CHECKING and function
  bodies included: a cycle there still means neither file reads without the other).
  `from package import module` counts as importing the module."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)
  # a package's own __init__ importing its submodules is not a dependency of theirs on it
  return {m for m in found if m in known and m != name and not m.startswith(name + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_two_module_cycle():
  assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_the_projects_modules():
  modules = _modules()
  known = set(modules)
  graph = {}
  for name, path in modules.items():
    deps = _imports(name, path, known)
    # importing a package runs its __init__, but a submodule importing its own package's
    # __init__ (for a sibling) is how packages work: count the sibling, not the package
    graph[name] = {d for d in deps if not name.startswith(d + ".")}
  assert _cycles(graph) == []


def test_the_library_reads_no_defaults_from_configs():
  """Defaults live in configs/ only; the library takes a config, it never imports one."""
  modules = _modules()
  offenders = {}
  for name, path in modules.items():
    if name.startswith(("fedjax_lora", "models")):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(m == "configs" or m.startswith("configs.") for m in mods):
          offenders[name] = node.lineno
  assert offenders == {}
