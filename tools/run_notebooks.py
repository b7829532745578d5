"""Execute notebooks as `nbdev_test` does (every cell but the `#| slow` and `#| gpu` ones) and save their outputs in
place, so that a reader on GitHub sees the figures and printed values. `make outputs` runs it on every notebook."""
import argparse, os, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

SKIP = ("slow", "gpu")

def skipped(cell) -> bool:
    "True for a cell `nbdev_test` does not run: markdown, `#| slow`, `#| gpu`, `#| eval: false`."
    if cell.cell_type != "code": return True
    flags = [l[3:].strip() for l in cell.source.splitlines() if l.startswith("#|")]
    return any(f.split(":")[0].strip() in SKIP or f.replace(" ", "") == "eval:false" for f in flags)

def run(path: Path) -> float:
    "Execute the notebook at `path` in its own directory and write it back with its outputs; the seconds it took."
    nb, t0, cwd = read_nb(path), time.time(), os.getcwd()
    for c in nb.cells:
        if c.cell_type == "code": c.outputs, c.execution_count = [], None   # a skipped cell keeps no stale output
    os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=skipped)
    finally: os.chdir(cwd)
    write_nb(nb, path)
    return time.time() - t0

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    for p in ap.parse_args().notebooks:
        print(f"{p}: {run(p):.0f} s", flush=True)
