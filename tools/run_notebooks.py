"""Execute notebooks as `nbdev_test` does (every cell but the `#| slow` and `#| gpu` ones) and save their outputs in
place, so that a reader on GitHub sees the figures and printed values. `make outputs` runs it on every notebook.
A committed notebook names no machine: the data root and the temporary directory in its text outputs are written
`$QUANTSTUDY_DATA` and `$TMPDIR`, and progress bars (stderr lines of `it/s]`) are dropped."""
import argparse, os, re, tempfile, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

SKIP = ("slow", "gpu")

def skipped(cell) -> bool:
    "True for a cell `nbdev_test` does not run: markdown, `#| slow`, `#| gpu`, `#| eval: false`."
    if cell.cell_type != "code": return True
    flags = [l[3:].strip() for l in cell.source.splitlines() if l.startswith("#|")]
    return any(f.split(":")[0].strip() in SKIP or f.replace(" ", "") == "eval:false" for f in flags)

def _is_progress(out) -> bool:
    "A stderr stream of progress bars (tqdm redraws with carriage returns) and nothing else."
    text = "".join(out.get("text", ""))
    return out.get("output_type") == "stream" and out.get("name") == "stderr" and all(
        not l.replace("\x1b[A", "").strip() or "it/s]" in l or "s/it]" in l for l in re.split(r"[\r\n]", text))   # \x1b[A: cursor up

def _anonymous(text: str) -> str:
    "`text` with this machine's data root and temporary directory written as variables."
    for path, name in ((os.environ.get("QUANTSTUDY_DATA"), "$QUANTSTUDY_DATA"), (tempfile.gettempdir(), "$TMPDIR")):
        if path: text = text.replace(str(Path(path).resolve()), name).replace(str(path).rstrip("/"), name)
    return text

def _clean(cell):
    "Drop progress bars; anonymize paths in text outputs."
    cell.outputs = [o for o in cell.outputs if not _is_progress(o)]
    for o in cell.outputs:
        if "text" in o: o["text"] = _anonymous("".join(o["text"]))
        for k, v in (o.get("data") or {}).items():
            if k.startswith("text/"): o["data"][k] = _anonymous("".join(v) if isinstance(v, list) else v)

def clean(path: Path):
    "Apply `_clean` to the saved outputs of the notebook at `path`."
    nb = read_nb(path)
    for c in nb.cells:
        if c.cell_type == "code": _clean(c)
    write_nb(nb, path)

def run(path: Path) -> float:
    "Execute the notebook at `path` in its own directory and write it back with its outputs; the seconds it took."
    nb, t0, cwd = read_nb(path), time.time(), os.getcwd()
    for c in nb.cells:
        if c.cell_type == "code": c.outputs, c.execution_count = [], None   # a skipped cell keeps no stale output
    os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=skipped)
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type == "code": _clean(c)
    write_nb(nb, path)
    return time.time() - t0

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    for p in ap.parse_args().notebooks:
        print(f"{p}: {run(p):.0f} s", flush=True)
