"config is a leaf: a preset and a bad value cost no torch import."
import subprocess, sys

def test_config_imports_neither_torch_nor_transformers():
    code = ("import sys, quantstudy.config as c; c.preset('smoke'); c.preset('paper', model={'n_layer': 6});"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out

def test_config_imports_nothing_of_the_package():
    import ast, pathlib, quantstudy.config as c
    tree = ast.parse(pathlib.Path(c.__file__).read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m.startswith(("quantstudy", "."))] and "torch" not in mods
