"The package's import structure: no import cycles, and the description half (config, paper, study, readers) without torch."
import ast, subprocess, sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quantstudy"

def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

def import_graph() -> dict[str, set[str]]:
    "Module -> the package modules it imports anywhere (a function's lazy import included: it is a cycle all the same)."
    mods = {module_name(p): p for p in PKG.rglob("*.py") if p.name != "_modidx.py"}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import): names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else: continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph

def cycles(graph) -> list[list[str]]:
    "The strongly connected components with more than one module (Tarjan)."
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return out

def test_the_graph_sees_a_cycle():
    "The checker itself: a made-up cycle is found, a chain is not."
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

KNOWN_CYCLES = [["quantstudy.evaluate.lambada", "quantstudy.evaluate.perplexity"], ["quantstudy.fused", "quantstudy.quantizers"]]  # issue 22, item 4: to remove

def test_no_new_import_cycles_in_the_package():
    "A new cycle fails; so does a known one that is gone (then delete it from KNOWN_CYCLES)."
    found = sorted(cycles(import_graph()))
    assert found == KNOWN_CYCLES, f"import cycles: {found} (known: {KNOWN_CYCLES}): move the shared part into a module both import"

TORCH_FREE = ["quantstudy.config", "quantstudy.paper", "quantstudy.study", "quantstudy.rundir", "quantstudy.reproduce",
              "quantstudy.scorecard", "quantstudy.report"]

def test_the_description_half_imports_without_torch():
    "A study's description and its readers import with torch and transformers blocked (a report needs no torch)."
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'datasets', 'lm_eval'): raise ImportError(f'blocked: {{name}}')
sys.meta_path.insert(0, Block())
for m in {TORCH_FREE!r}: __import__(m)
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
