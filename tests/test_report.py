"""The report from results.json files alone, written by real runs (conftest's `results_like`): layout, run states,
paper numbers beside ours, aggregation over training seeds (mean, sd, min-max, n; outcomes noted), determinism, tolerance."""
import csv, dataclasses, math, statistics
from pathlib import Path
import pytest
from conftest import write_study
from quantstudy.report import (FIGURES, PAPER, TABLES, TASK_COLUMNS, divergence_note, mean_curve, quant_label, render_summary,
                               render_table, report, row_label, run_state)
from quantstudy.rundir import SCHEMA, Results, Status
from quantstudy.study import Study, load_study, val_curve

NO_DATA = {"wnli": "no local data for wnli"}   # MNLI is skipped by the real run itself (no faithful local copy)
RUNS = {"baseline": dict(final_loss=5.2, skipped=NO_DATA), "w4-channel": dict(final_loss=5.6, skipped=NO_DATA),
        "w8-tensor": dict(final_loss=5.35), "w8-channel": dict(final_loss=5.15),
        "g4-tensor": dict(status="diverged", step=120), "g4-token": dict(status="failed", step=60),
        "g8-token": dict(final_loss=5.7), "a8-token": dict(final_loss=5.25), "w8a8": dict(final_loss=5.3),
        "ptq-w8-channel": dict(final_loss=5.21), "ptq-a4-tensor": dict(final_loss=9.5)}

def study_results(results_like, study: str, runs=RUNS) -> dict[str, Results]:
    "The `Results` of `runs` (name -> results_like's keywords) as study `study`."
    return {name: results_like(name, study=study, **kw) for name, kw in runs.items()}

def as_study(name: str, results) -> Study:
    "The `Study` `name` of `results` (any experiments and seeds), as `load_study` would read it."
    runs = {}
    for r in results: runs.setdefault(r.experiment, {})[r.seed] = r
    return Study(name, runs)

def read_csv(p: Path) -> list[list[str]]: return list(csv.reader(p.read_text().splitlines()))
def read_csv_text(text: str) -> list[list[str]]: return list(csv.reader(text.splitlines()))

def table(stem): return next(t for t in TABLES if t.stem == stem)

def means(row: list[str], k: int) -> list[str]:
    "The `mean` cells of a CSV row of `k` metric columns (each: mean, sd, min, max, n)."
    return row[2:2 + 5 * k:5]

def task_cells(r: Results) -> list[str]:
    "The cells a task table prints for `r`, read from its metrics: accuracy in %, `-` where skipped or absent, the Average."
    accs = []
    for t in TASK_COLUMNS:
        acc = (r.metrics["tasks"].get(t) or {}).get("acc")
        if acc is None and t == "lambada_openai": acc = (r.metrics.get("lambada") or {}).get("acc")   # our own scorer's
        accs.append(None if acc is None else 100 * acc)
    nums = [a for a in accs if a is not None]
    return ["-" if a is None else f"{a:.2f}" for a in accs] + [f"{sum(nums) / len(nums):.2f}"]

@pytest.fixture(scope="module")
def smoke(results_like, tmp_path_factory):
    res = study_results(results_like, "smoke")
    root = write_study(tmp_path_factory.mktemp("runs"), "smoke", res)
    out = tmp_path_factory.mktemp("figures")
    return root, out, report("smoke", root, out), res

def test_files_written(smoke):
    root, out, paths, _ = smoke
    names = [p.name for p in paths]
    assert len(names) == len(set(names)) and all(p.parent == out / "smoke" and p.exists() for p in paths)
    expected = {f"{f.stem}.png" for f in FIGURES} | {f"{f.stem}_tasks.png" for f in FIGURES if f.tasks}
    expected |= {f"{t.stem}.{e}" for t in TABLES for e in ("md", "csv")} | {"summary.md", "scorecard.md", "table01_baseline_vs_gpt2.md", "table01_baseline_vs_gpt2.csv"}
    assert set(names) == expected
    assert {"fig04_weights.png", "fig04_weights_tasks.png", "fig08_a4_channel.png", "fig13_combined.png",
            "table02_weights_ppl.csv", "table06_weights_tasks.md", "table10_ptq_weights.md", "table11_ptq_activations.csv"} <= expected
    for p in paths:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in data and b"matplotlib" not in data

def test_run_states_in_tables(smoke):
    _, out, _, res = smoke
    t4 = read_csv(out / "smoke" / "table04_gradients_ppl.csv")
    assert t4[0] == ["#bit", "granularity", *(f"{c} {s}" for c in ("WikiText103", "WikiText2", "PTB", "1BW")
                                                for s in ("mean", "sd", "min", "max", "n")), "seeds", "experiment"]
    by = {r[-1]: r for r in t4[1:]}
    assert [r[-1] for r in t4[1:]] == list(table("table04_gradients_ppl").rows)         # the paper's row order
    assert by["g4-tensor"][:2] == ["4 bit", "per-tensor"] and means(by["g4-tensor"], 4) == ["diverged@120"] * 4
    assert by["g4-tensor"][3:7] == ["", "", "", "0"] and by["g4-tensor"][-2] == ""       # no number: no spread, n = 0, no seed
    assert means(by["g4-token"], 4) == ["failed"] * 4 and means(by["g8-tensor"], 4) == ["not run"] * 4
    ppl = res["g8-token"].metrics["perplexity"]                                          # what the run wrote
    wt2 = f"{ppl['wikitext2']:.2f}"
    assert means(by["g8-token"], 4)[1:3] == [wt2, f"{ppl['ptb']:.2f}"] and means(by["g8-token"], 4)[0] == "-"
    assert by["g8-token"][7:12] == [wt2, "", wt2, wt2, "1"] and by["g8-token"][-2] == "0"  # one seed: sd empty, min = max = mean
    md = (out / "smoke" / "table04_gradients_ppl.md").read_text()
    assert "diverged@120" in md and "out of memory" in md and "not comparable" in md
    assert "17990.70" not in md and "ours / paper" not in md                              # no paper numbers outside `paper`
    assert "±" not in md and "| seeds |" not in md and f"| 8 bit | per-token | - | {wt2} |" in md   # one seed renders as before

def test_task_table_percent_skips_and_average(smoke):
    _, out, _, res = smoke
    rows = read_csv(out / "smoke" / "table06_weights_tasks.csv")
    assert rows[0][2::5][:11] == [f"{c} mean" for c in ["MNLI", "MRPC", "RTE", "QNLI", "SST", "WNLI", "ARC-Easy", "ARC-Challenge",
                                                         "LAMBADA", "HellaSwag", "Average"]] and rows[0][-2:] == ["seeds", "experiment"]
    base = rows[1]
    assert base[-1] == "baseline" and means(base, 11) == task_cells(res["baseline"])
    assert means(base, 11)[0] == means(base, 11)[5] == "-" and means(base, 11)[6] != "-"   # skipped MNLI, WNLI; ARC-Easy measured
    w8 = next(r for r in rows if r[-1] == "w8-tensor")
    assert means(w8, 11) == task_cells(res["w8-tensor"])
    assert all(0 <= float(v) <= 100 for v in means(w8, 11) if v != "-")
    md = (out / "smoke" / "table06_weights_tasks.md").read_text()
    mnli = res["baseline"].metrics["tasks"]["mnli"]["skipped"]                     # the real run's own reason
    assert f"skipped: {mnli}" in md and "`-` WNLI, `baseline`, `w4-channel`: skipped: no local data for wnli" in md
    assert "`-` WNLI, `w8-tensor`, `w8-channel`: not evaluated" in md     # the other rows: not skipped, just not evaluated

def test_ptq_tables(smoke):
    _, out, _, res = smoke
    t10, t11 = read_csv(out / "smoke" / "table10_ptq_weights.csv"), read_csv(out / "smoke" / "table11_ptq_activations.csv")
    assert [r[:2] for r in t10[1:]] == [["", "baseline"], ["4 bit", "per-tensor"], ["4 bit", "per-column"],
                                         ["8 bit", "per-tensor"], ["8 bit", "per-column"]]
    assert t10[-1][-1] == "ptq-w8-channel" and means(t10[-1], 4)[1] == f"{res['ptq-w8-channel'].metrics['perplexity']['wikitext2']:.2f}"
    assert means(t10[2], 4) == ["not run"] * 4
    a4 = res["ptq-a4-tensor"].metrics["perplexity"]["wikitext2"]
    assert t11[2][-1] == "ptq-a4-tensor" and means(t11[2], 4)[1] == f"{a4:.2f}" and a4 > res["baseline"].metrics["perplexity"]["wikitext2"]

def test_summary(smoke):
    _, out, _, res = smoke
    s = (out / "smoke" / "summary.md").read_text()
    assert "| g4-tensor | 1 | diverged |" in s and "| g4-token | 1 | failed |" in s and "`v8-tensor`" in s  # not run listed
    assert f"| baseline | 1 | complete | {res['baseline'].final_val_loss:.2f} | 8 |" in s and "out of memory" in s
    assert s.index("| baseline |") < s.index("| w4-channel |") < s.index("| g4-tensor |")      # the paper's order
    warmup = res["baseline"].config["train"]["warmup_steps"]
    micro = res["baseline"].config["train"]["micro_batch_size"]
    for line in (f"| warmup steps | {warmup} | 1000 | no |", f"| sequences per device and pass | {micro} | 32 | {'yes' if micro == 32 else 'no'} |",
                 "| weight decay | 0.1 | 0.1 | yes |", "| grad clip | 1 | 1 | yes |", "| AdamW betas | (0.9, 0.999) | (0.9, 0.999) | yes |",
                 "| dropout | 0.1 | 0.1 | yes |", "| tied LM head | yes | yes | yes |", "| EOS between documents | no | no | yes |"):
        assert line in s, line
    assert "| schedule |" not in s and "Learning-rate schedule: linear warmup, then cosine to 0 in every run" in s   # not an option
    assert "W 8-channel, A 8-token" in s and "PTQ A 4-tensor of baseline" in s

def test_deterministic(results_like, tmp_path):
    root = write_study(tmp_path / "runs", "smoke", study_results(results_like, "smoke"))
    a, b = report("smoke", root, tmp_path / "a"), report("smoke", root, tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name        # md, csv and (with Agg and no Software stamp) png

def test_paper_study_shows_paper_numbers(results_like, tmp_path):
    res = study_results(results_like, "paper")
    root = write_study(tmp_path / "runs", "paper", res)
    report("paper", root, tmp_path / "figs")
    out = tmp_path / "figs" / "paper"
    md = (out / "table04_gradients_ppl.md").read_text()
    assert "ours / paper" in md and "Chitsaz et al. 2024, Table 4" in md
    assert "| 4 bit | per-tensor | diverged@120 / 17990.70 |" in md and "not run / 123.08" in md
    assert f"| 8 bit | per-token | - / 59.24 | {res['g8-token'].metrics['perplexity']['wikitext2']:.2f} / 47.50 |" in md
    head, *rows = read_csv(out / "table02_weights_ppl.csv")
    assert head[22:] == ["WikiText103 (paper)", "WikiText2 (paper)", "PTB (paper)", "1BW (paper)", "seeds", "experiment"]
    assert rows[0][22:26] == ["39.94", "34.32", "35.13", "44.03"] and rows[1][22:26] == ["55.50", "46.70", "52.38", "59.14"]
    t11 = read_csv(out / "table11_ptq_activations.csv")
    assert t11[2][22:26] == ["-"] * 4 and t11[5][22:26] == ["40.09", "34.44", "35.43", "44.37"]   # the paper's dash; its last row
    t7 = read_csv(out / "table07_activations_tasks.csv")
    assert t7[0][57:68] == [f"{c} (paper)" for c in [*TASK_COLUMNS.values(), "Average"]] and t7[3][57:68] == \
        [f"{v:.2f}" for v in PAPER[7]["a4-token-asym"]]

def test_paper_numbers():
    assert PAPER[2]["baseline"] == (39.94, 34.32, 35.13, 44.03) and PAPER[4]["g4-tensor"][0] == 17990.70
    assert PAPER[6]["w8-channel"][-1] == 44.10 and PAPER[9]["m8-tensor"][5] == 60.56 and PAPER[10]["ptq-w4-tensor"][0] == 16196.10
    for n in (2, 3, 4, 5, 10, 11): assert all(len(r) == 4 for r in PAPER[n].values())
    for n in (6, 7, 8, 9):
        for name, r in PAPER[n].items(): assert abs(sum(r[:10]) / 10 - r[10]) <= 0.01, (n, name)   # printed averages agree
    for t in TABLES: assert list(PAPER[t.number]) == [r for r in t.rows if r in PAPER[t.number]], t.stem  # same order

# ---- seeds: each cell the mean over the seeds with numbers, sd, min-max and n; outcomes and left-out seeds noted

def unstable(results_like, name, seed, final_loss, spikes):
    "A seed of `name` that spiked above the divergence bound at `spikes` and trained on, finite, to the end (evaluated)."
    rec = dict(step=spikes[0], reason="eval_loss above the bound for 2 evaluations", spikes=[dict(step=s, loss=9.0, bound=8.0) for s in spikes])
    return dataclasses.replace(results_like(name, study="s", seed=seed, final_loss=final_loss, divergence=rec), status="unstable")

@pytest.fixture(scope="module")
def seeds3(results_like, tmp_path_factory):
    "A study `s` of three seeds: baseline complete; w8-channel: seed 2 failed; v8-channel: seeds 0, 1 unstable; w4-channel: seed 1 1.2 nats above its baseline."
    run = lambda name, seed, loss: results_like(name, study="s", seed=seed, final_loss=loss)
    rs = [run("baseline", s, l) for s, l in enumerate((5.2, 5.3, 5.4))]
    rs += [run("w8-channel", 0, 5.1), run("w8-channel", 1, 5.2), results_like("w8-channel", "failed", study="s", seed=2, step=4)]
    rs += [unstable(results_like, "v8-channel", 0, 5.5, [4]), unstable(results_like, "v8-channel", 1, 5.6, [4, 8]), run("v8-channel", 2, 5.4)]
    rs += [run("w4-channel", 0, 5.6), run("w4-channel", 1, 6.5), run("w4-channel", 2, 5.7)]
    root = write_study(tmp_path_factory.mktemp("runs"), "s", rs)
    out = tmp_path_factory.mktemp("figures")
    return report("s", root, out), out / "s", as_study("s", rs)

def test_seed_cells_are_mean_sd_min_max_n(seeds3):
    _, out, st = seeds3
    wt2 = [r.metrics["perplexity"]["wikitext2"] for r in st.results("baseline")]        # what the three runs wrote
    assert wt2[1] / wt2[0] == pytest.approx(math.exp(0.1))                              # losses 5.2, 5.3, 5.4: the scaled perplexities
    rows = {r[-1]: r for r in read_csv(out / "table02_weights_ppl.csv")[1:]}
    mean, sd = statistics.fmean(wt2), statistics.stdev(wt2)
    assert rows["baseline"][7:12] == [f"{mean:.2f}", f"{sd:.2f}", f"{min(wt2):.2f}", f"{max(wt2):.2f}", "3"] and rows["baseline"][-2] == "0 1 2"
    md = (out / "table02_weights_ppl.md").read_text()
    assert "| seeds | experiment |" in md and f"| {mean:.2f} ± {sd:.2f} |" in md and "mean over the seeds with numbers ± their sample sd" in md
    s = (out / "summary.md").read_text()
    assert "| baseline | 3 | complete | 5.30 ± 0.10 (5.20-5.40) | 8 |" in s and "12 runs with results (4 experiments, training seeds 0, 1, 2)" in s

def test_failed_seed_is_left_out_and_noted(seeds3):
    _, out, st = seeds3
    wt2 = [st.get("w8-channel", s).metrics["perplexity"]["wikitext2"] for s in (0, 1)]
    row = next(r for r in read_csv(out / "table02_weights_ppl.csv") if r[-1] == "w8-channel")
    assert row[7:12] == [f"{statistics.fmean(wt2):.2f}", f"{statistics.stdev(wt2):.2f}", f"{min(wt2):.2f}", f"{max(wt2):.2f}", "2"]
    assert row[-2] == "0 1"                                                              # the seeds in the cell
    md = (out / "table02_weights_ppl.md").read_text()
    assert f"| 8 bit | per-channel | " in md and "| 2 of 3 | w8-channel |" in md
    assert ("`w8-channel`: seeds 0, 1 complete, seed 2 failed (cell 3: RuntimeError: out of memory); "
            "seed 2 left out of the cells (no numbers)") in md
    assert "| w8-channel | 3 | seeds 0, 1 complete, seed 2 failed | 5.15 ± 0.07 (5.10-5.20) |" in (out / "summary.md").read_text()

def test_unstable_seeds_keep_their_numbers_and_are_noted(seeds3):
    _, out, st = seeds3
    assert st.outcomes("v8-channel") == {0: "unstable", 1: "unstable", 2: "complete"} and all(run_state(r) is None for r in st.results("v8-channel"))
    row = next(r for r in read_csv(out / "table12b_second_moment_ppl.csv") if r[-1] == "v8-channel")
    assert row[11] == "3" and row[-2] == "0 1 2"                                         # the unstable seeds are in the cells
    note = ("`v8-channel`: seeds 0, 1 unstable (seed 0: spikes at step 4; seed 1: spikes at steps 4, 8), seed 2 complete; "
            "trained on to step 8 and evaluated there")
    assert divergence_note(st, "v8-channel") == note and note in (out / "table12b_second_moment_ppl.md").read_text()
    assert "trained on to `max_steps`" in (out / "table12b_second_moment_ppl.md").read_text() and "early stopping" not in (out / "summary.md").read_text()

def test_a_seed_far_above_its_baseline_is_diverged(seeds3):
    _, out, st = seeds3
    assert st.outcomes("w4-channel") == {0: "complete", 1: "diverged", 2: "complete"}      # 6.5 - 5.3 = 1.2 nats
    md = (out / "table02_weights_ppl.md").read_text()
    assert "`w4-channel`: seeds 0, 2 complete, seed 1 diverged (final val loss 6.50, 1.20 nats above the baseline of seed 1 (more than 1))" in md
    assert "| 3 | w4-channel |" in md                                                    # evaluated: its numbers stay in the cell

def test_curves_are_the_mean_over_seeds(seeds3):
    paths, _, st = seeds3
    curves = [val_curve(r) for r in st.results("v8-channel")]
    steps, mean, lo, hi = mean_curve(curves)
    assert steps == curves[0][0] and mean[-1] == pytest.approx((5.5 + 5.6 + 5.4) / 3) and (lo[-1], hi[-1]) == pytest.approx((5.4, 5.6))
    assert mean_curve([([0, 4], [9.0, 6.0]), ([0], [7.0])]) == ([0, 4], [8.0, 6.0], [7.0, 6.0], [9.0, 6.0])   # a step only one seed has
    assert {"fig12_second_moment.png", "fig04_weights_tasks.png"} <= {p.name for p in paths}

# ---- tolerance, variants, labels

def test_tolerant_loading(results_like, tmp_path):
    root = write_study(tmp_path, "s", {"baseline": results_like("baseline", study="s")})
    (root / "s" / "w4-tensor").mkdir()                                   # started, no results.json
    (root / "s" / "w8-tensor").mkdir()
    (root / "s" / "w8-tensor" / "results.json").write_text("{truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        st = load_study(root / "s")
    assert sorted(st.runs) == ["baseline", "w8-tensor"] and st.first("w8-tensor").status == Status.FAILED
    md, _ = render_table(table("table02_weights_ppl"), st)
    assert "| 8 bit | per-tensor | failed |" in md and "unreadable results.json" in md and "| 4 bit | per-tensor | not run |" in md
    with pytest.raises(FileNotFoundError, match="no results directory"): report("nope", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="study name"): report("../s", tmp_path, tmp_path / "out")   # neither root is left

def test_another_schema_is_named(tiny_run, tmp_path):
    newer = dataclasses.replace(tiny_run.results(), study="s", schema=SCHEMA + 1)   # a results.json of a later quantstudy
    write_study(tmp_path, "s", {"baseline": newer})
    with pytest.warns(UserWarning, match=f"results schema {SCHEMA + 1}; this quantstudy reads schema {SCHEMA}"):
        st = load_study(tmp_path / "s")
    r = st.first("baseline")
    assert r.status == Status.FAILED and r.experiment == "baseline" and f"results schema {SCHEMA + 1}" in r.reason
    md, _ = render_table(table("table02_weights_ppl"), st)
    assert "|  | baseline | failed | failed |" in md and f"results schema {SCHEMA + 1}" in md

def test_empty_study_is_an_error_not_empty_figures(tmp_path):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no <experiment>/results.json under"): report("empty", tmp_path / "runs", tmp_path / "out")
    assert not (tmp_path / "out").exists()

def test_metric_variants(results_like):
    r = results_like("baseline")
    ppl = r.metrics["perplexity"]                                   # this Results' own dict: editing it touches no other
    assert "lm1b" not in ppl and "wikitext2" in ppl                 # the tiny run evaluates WikiText2 and PTB only
    ppl["ptb"] = float("inf")
    md, text = render_table(table("table02_weights_ppl"), as_study("x", [r]))
    base = means(read_csv_text(text)[1], 4)
    assert base[1] == f"{ppl['wikitext2']:.2f}" and base[2] == "inf" and base[3] == "-" and "not evaluated" in md
    tasks = table("table06_weights_tasks")
    _, text = render_table(tasks, as_study("x", [r]))
    assert means(read_csv_text(text)[1], 11)[8] == f"{100 * r.metrics['lambada']['acc']:.2f}"   # our LAMBADA scorer, no lm-eval task
    r.metrics["tasks"] = {**r.metrics["tasks"], "lambada_openai": {"acc": 0.3597}}     # lm-eval's task name wins
    _, text = render_table(tasks, as_study("x", [r]))
    row = means(read_csv_text(text)[1], 11)
    arc = 100 * r.metrics["tasks"]["arc_easy"]["acc"]
    assert row[8] == "35.97" and row[10] == f"{(arc + 35.97) / 2:.2f}"                 # the Average over the tasks it has
    r.metrics = {k: v for k, v in r.metrics.items() if k != "lambada"}
    r.metrics["tasks"] = {k: v for k, v in r.metrics["tasks"].items() if k != "lambada_openai"}
    md, text = render_table(tasks, as_study("x", [r]))
    assert means(read_csv_text(text)[1], 11)[8] == "-" and "`-` LAMBADA, `baseline`: not evaluated" in md

def test_labels_and_validation(results_like, tiny_run):
    assert row_label("a4-token-asym") == ("4 bit", "per-token asymmetric") and row_label("ptq-a4-channel") == ("4 bit", "per-column")
    assert quant_label(results_like("w8a8g8").config) == "W 8-channel, A 8-token, G 8-token"
    assert quant_label(results_like("g8-token-input").config) == "G 8-token (input grads only)"
    assert quant_label(results_like("m4-channel").config) == "M 4-channel" and quant_label(tiny_run.results().config) == "none"
    assert quant_label(results_like("ptq-w8-channel").config) == "PTQ W 8-channel of baseline"
    with pytest.raises(ValueError, match="status='done'"): Results.from_dict({**tiny_run.results().to_dict(), "status": "done"})
    s = render_summary(Study("x"))
    assert "0 runs with results" in s and "| warmup steps | - | 1000 | - |" in s
