"The scorecard (notebook 12): each claim judged from results.json files built here, in the format runner/template write."
import json
import pytest
from quantstudy import scorecard as S
from quantstudy.cli import main
from quantstudy.report import fake_results as _fake

BASE = 5.6


def fake_results(name, final_loss=BASE, **kw):
    "report.fake_results (schema 1, as runner writes) with the last validation loss exactly `final_loss`."
    r = _fake(name, final_loss=final_loss, **kw)
    if r["status"] == "complete" and r["curves"]["val"]: r["curves"]["val"][-1]["loss"] = final_loss
    return r


def _sharp(scale):
    return {"data": {"analysis": "sharpness", "sharpness": [0.1 * scale, 0.3 * scale, 0.6 * scale]}}


def _baseline():
    r = fake_results("baseline", final_loss=BASE)
    acc = lambda act: {"parameters": 100, "gradients": 100, "optimizer_state": 200, "optimizer_buffers": 0, "saved_activations": act}
    r["analysis"] = {
        "sharpness": _sharp(1.0),
        "linear_time": {"data": {"rows": [{"seq_len": 128, "share": 0.86}, {"seq_len": 512, "share": 0.81}, {"seq_len": 1024, "share": 0.7}]}},
        "memory": {"data": {"rows": [{"sweep": "batch", "batch_size": 1, "accounting": acc(50)},
                                     {"sweep": "batch", "batch_size": 32, "accounting": acc(900)},
                                     {"sweep": "seq", "batch_size": 4, "accounting": acc(10)}]}},
    }
    return r


def _ptq(name, ppl_factor):
    r = fake_results(name, final_loss=BASE)
    r["metrics"]["perplexity"] = {k: v * ppl_factor for k, v in r["metrics"]["perplexity"].items()}
    return r


def paper_like_study() -> dict:
    "A study whose numbers show every claim of the paper (and the new one)."
    about = lambda n, f=1.005: fake_results(n, final_loss=BASE * f)
    div = lambda n, stop=60: fake_results(n, status="diverged", stop=stop)
    worse = lambda n: fake_results(n, final_loss=BASE * 1.06)
    res = {"baseline": _baseline(), "w8-tensor": about("w8-tensor"), "w8-channel": about("w8-channel"),
           "w4-tensor": fake_results("w4-tensor", final_loss=BASE * 1.10), "w4-channel": fake_results("w4-channel", final_loss=BASE * 1.03),
           "a8-token": about("a8-token"), "a4-tensor": div("a4-tensor"),
           "a4-token": fake_results("a4-token", final_loss=BASE * 1.08), "a4-token-asym": fake_results("a4-token-asym", final_loss=BASE * 1.04),
           "a4-channel": worse("a4-channel"), "g4-tensor": div("g4-tensor"), "g4-token": div("g4-token"), "g8-token": worse("g8-token"),
           "g8-tensor": div("g8-tensor"), "g8-token-input": div("g8-token-input", stop=40), "m8-channel": about("m8-channel"),
           "m4-tensor": div("m4-tensor"), "v8-tensor": div("v8-tensor"), "v8-channel": div("v8-channel"), "w8a8": about("w8a8"),
           "w8a8g8": worse("w8a8g8"),
           **{n: _ptq(n, 1.01) for n in ("ptq-w8-tensor", "ptq-w8-channel", "ptq-a8-tensor", "ptq-a8-channel")},
           **{n: _ptq(n, 100.0) for n in ("ptq-w4-tensor", "ptq-w4-channel")},
           **{n: about(n, 1.004) for n in ("v8-channel-unsigned", "v8-block128", "v4-rank1-nozero", "m4v4-li")}}
    for n in ("w4-tensor", "w4-channel"): res[n]["analysis"] = {"sharpness": _sharp(1.5)}
    return res


def verdicts(results):
    return {r["key"]: r["verdict"] for r in S.scorecard(results)}


def test_every_claim_listed_once():
    keys = [c.key for c in S.CLAIMS]
    assert len(keys) == len(set(keys)) >= 22
    assert {"w8", "w4-channel", "a8-token", "a4-tensor", "a4-asym", "a4-channel", "g4", "g8-token", "g8-tensor", "g-input",
            "m8", "m4-tensor", "v8", "w8a8", "w8a8g8", "ptq8", "ptq4", "sharpness", "linear-time", "memory", "fixed-v", "fixed-v-nozero"} == set(keys)


def test_a_paper_like_study_reproduces_everything():
    v = verdicts(paper_like_study())
    assert set(v.values()) == {"reproduced"}, {k: x for k, x in v.items() if x != "reproduced"}


def test_an_empty_study_runs_nothing():
    assert set(verdicts({}).values()) == {"not run"}


def test_verdicts_flip_with_the_numbers():
    res = paper_like_study()
    res["v8-channel"] = fake_results("v8-channel", final_loss=BASE * 1.001)         # converges: the paper's claim fails
    res["w8-tensor"] = fake_results("w8-tensor", final_loss=BASE * 1.021)           # just outside "about" (2%)
    res["g8-token-input"] = fake_results("g8-token-input", status="diverged", stop=250)   # diverges, but late (of 300)
    res["v4-rank1-nozero"] = fake_results("v4-rank1-nozero", final_loss=BASE * 1.011)   # outside the new claim's 1%
    res["baseline"]["analysis"]["linear_time"]["data"]["rows"][1]["share"] = 0.9       # share rises with length
    res["w4-channel"]["analysis"]["sharpness"] = _sharp(0.9)
    v = verdicts(res)
    for key in ("v8", "w8", "g-input", "fixed-v", "fixed-v-nozero", "linear-time", "sharpness"): assert v[key] == "not reproduced", key
    assert v["w8a8"] == "reproduced"


def test_boundaries_follow_the_declared_tolerances():
    res = {"baseline": _baseline()}
    for f, want in ((1 + 0.99 * S.TOLERANCES["about"], "reproduced"), (1 + 1.01 * S.TOLERANCES["about"], "not reproduced")):
        res["w8a8"] = fake_results("w8a8", final_loss=BASE * f)
        assert verdicts(res)["w8a8"] == want, f
    # "diverges" also means ending more than 1 nat above the baseline without a recorded divergence
    res["m4-tensor"] = fake_results("m4-tensor", final_loss=BASE + S.TOLERANCES["diverge_nats"] + 0.05)
    assert verdicts(res)["m4-tensor"] == "reproduced"
    res["m4-tensor"] = fake_results("m4-tensor", final_loss=BASE + S.TOLERANCES["diverge_nats"] - 0.05)
    assert verdicts(res)["m4-tensor"] == "not reproduced"


def test_failed_runs_are_not_judged():
    res = {"baseline": _baseline(), "w8a8": fake_results("w8a8", status="failed", stop=10)}
    row = next(r for r in S.scorecard(res) if r["key"] == "w8a8")
    assert row["verdict"] == "not run" and "failed" in row["numbers"]
    res["baseline"] = fake_results("baseline", status="failed", stop=5)
    assert verdicts(res)["w8"] == "not run"


def test_partial_claims_name_what_was_not_run():
    res = {"baseline": _baseline(), "w8-channel": fake_results("w8-channel", final_loss=BASE)}
    row = next(r for r in S.scorecard(res) if r["key"] == "w8")
    assert row["verdict"] == "reproduced" and "`w8-tensor` not run" in row["numbers"]


def _write_study(root, results):
    for name, r in results.items():
        d = root / "study" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))
    return root


def test_write_and_cli(tmp_path, capsys):
    root = _write_study(tmp_path / "runs", paper_like_study())
    assert main(["scorecard", "study", "--runs-root", str(root), "--out", str(tmp_path / "figs")]) == 0
    md = (tmp_path / "figs" / "study" / "scorecard.md").read_text()
    assert md.count("**reproduced**") == len(S.CLAIMS) and "`about`: 0.02" in md and "| 22 |" in md
    assert str(tmp_path / "figs" / "study" / "scorecard.md") in capsys.readouterr().out
    assert not list((tmp_path / "figs" / "study").glob(".scorecard.md.*"))      # the temporary file was renamed
    assert main(["scorecard", "nope", "--runs-root", str(root), "--out", str(tmp_path / "figs")]) == 2
    assert "no results directory" in capsys.readouterr().err


def test_small_scale_notes_only_for_claims_that_fail():
    res = paper_like_study()
    res["a4-tensor"] = fake_results("a4-tensor", final_loss=BASE * 1.01)
    md = S.render_scorecard("smoke", res)
    assert "(a4-tensor):" in md and "(g4):" not in md
