"""Evaluation: C-index, splits, bad inputs, metrics, attention localisation and train_cv end to end on a tiny cohort."""
import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest

from wsi_study.core import WsiStudyError
from wsi_study.evaluation.attention import localisation_auc, patch_truth, write_attention
from wsi_study.evaluation.cv import bench_mil, train_cv, write_synthetic_cohort
from wsi_study.evaluation.metrics import PROB_COLS, bootstrap, compare_runs, harrell_cindex, oracle_cindex, stage_metrics
from wsi_study.evaluation.splits import check_splits, load_splits, make_splits, save_splits
from wsi_study.models.bags import load_bags, synthetic_bags, write_features


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    "A 32-patient cohort of feature files (one slide each, 16-d) with a planted stage and survival signal."
    return write_synthetic_cohort(tmp_path_factory.mktemp("mil"), synthetic_bags(32, dim=16, seed=0))


@pytest.fixture
def warnings_of_wsi_study(caplog):
    "Capture the package logger (it does not propagate to the root logger)."
    log = logging.getLogger("wsi_study")
    log.addHandler(caplog.handler)
    yield caplog
    log.removeHandler(caplog.handler)


def test_cindex_matches_lifelines():
    """Harrell's C equals lifelines' concordance_index (risk negated), ties in time and risk included."""
    from lifelines.utils import concordance_index
    rng = np.random.default_rng(3)
    for _ in range(5):
        t = rng.integers(1, 8, 50).astype(float)
        r = rng.integers(0, 5, 50).astype(float)
        e = rng.integers(0, 2, 50)
        assert abs(harrell_cindex(t, r, e) - concordance_index(t, -r, e)) < 1e-12
    assert harrell_cindex([1, 2, 3, 4], [4, 3, 2, 1], [1, 1, 1, 0]) == 1.0
    assert np.isnan(harrell_cindex([1, 2], [1, 2], [0, 0]))


def test_splits_contract_and_stratification(tmp_path):
    """Every patient is tested exactly once, has one role per fold, folds are stratified, files round-trip."""
    lab = synthetic_bags(40).labels
    for task, col in (("stage", "stage_index"), ("survival", "event")):
        sp = make_splits(lab, task, folds=5, seed=7)
        test = sp[sp.role == "test"]
        assert sorted(test.patient_id) == sorted(lab.index) and not test.patient_id.duplicated().any()
        assert not sp.duplicated(["fold", "patient_id"]).any()
        assert (sp.groupby("fold").size() == len(lab)).all()
        per_fold = test.merge(lab, left_on="patient_id", right_index=True).groupby(["fold", col]).size().unstack(fill_value=0)
        assert (per_fold.max() - per_fold.min()).max() <= 1  # stratified: each class spread evenly over folds
        assert (sp[sp.role == "val"].groupby("fold").size() > 0).all()
        back = load_splits(save_splits(sp, tmp_path / f"{task}.csv"), lab, task)
        assert back.astype(str).equals(sp.astype(str))
    assert make_splits(lab, "stage", 5, seed=7).equals(make_splits(lab, "stage", 5, seed=7))


def test_fold_without_events_is_an_error(tmp_path):
    """Too few events for the folds: a WsiStudyError that says to use fewer folds."""
    bags = synthetic_bags(20)
    bags.labels = bags.labels.assign(event=0.0)
    bags.labels.iloc[[0, 1], bags.labels.columns.get_loc("event")] = 1.0
    with pytest.raises(WsiStudyError, match="use fewer folds"):
        check_splits(make_splits(bags.labels, "survival", folds=5), bags.labels, "survival")
    with pytest.raises(WsiStudyError, match="use fewer folds"):
        train_cv(bags, None, "meanpool", "survival", tmp_path, folds=5, progress=False)


def test_bad_splits_files(tmp_path):
    """A splits file missing cohort patients, or testing a patient twice, is refused with a message."""
    lab = synthetic_bags(12).labels
    sp = make_splits(lab, "stage", folds=3)
    save_splits(sp[sp.patient_id != "p003"], tmp_path / "s.csv")
    with pytest.raises(WsiStudyError, match="not in the splits file"):
        load_splits(tmp_path / "s.csv", lab, "stage")
    twice = sp.copy()
    twice.loc[(twice.patient_id == "p003") & (twice.role != "test"), "role"] = "test"
    with pytest.raises(WsiStudyError, match="more than one test fold"):
        check_splits(twice, lab, "stage")


def _manifest(tmp_path, rows):
    (tmp_path / "m.csv").write_text("slide_id,patient_id,path,stage,survival_months,event\n" +
                                    "".join(f"{s},{p},m.csv,B,10,1\n" for s, p in rows))
    return tmp_path / "m.csv"


def test_bad_feature_files_are_named(tmp_path):
    """Missing files, different dimensions and NaN/inf are reported together, naming the slides."""
    man = _manifest(tmp_path, [("s1", "p1"), ("s2", "p2"), ("s3", "p3"), ("s4", "p4")])
    write_features(tmp_path / "f" / "s1.h5", np.zeros((3, 8)))
    write_features(tmp_path / "f" / "s2.h5", np.zeros((3, 6)))
    bad = np.zeros((3, 8)); bad[1, 2] = np.inf; bad[0, 0] = np.nan
    write_features(tmp_path / "f" / "s3.h5", bad)
    with pytest.raises(WsiStudyError) as e:
        load_bags(man, tmp_path / "f")
    msg = str(e.value)
    assert "no feature file" in msg and "s4" in msg
    assert "differ in dimension" in msg and "s2" in msg and "D=6" in msg and "D=8" in msg
    assert "NaN or inf" in msg and "s3 (2 values)" in msg
    with pytest.raises(WsiStudyError, match="pass the encoder name"):
        load_bags(man, tmp_path)


def test_patient_without_patches_is_left_out(tmp_path, warnings_of_wsi_study):
    """A patient whose slides have no patches is dropped with a warning naming it."""
    man = _manifest(tmp_path, [("s1", "p1"), ("s2", "p2"), ("s3", "p2")])
    write_features(tmp_path / "f" / "s1.h5", np.ones((4, 5)))
    write_features(tmp_path / "f" / "s2.h5", np.zeros((0, 5)))
    write_features(tmp_path / "f" / "s3.h5", np.zeros((0, 5)))
    bags = load_bags(man, tmp_path / "f")
    assert bags.patients == ["p1"]
    assert "patient p2 has no patches" in warnings_of_wsi_study.text


def test_stage_metrics_and_bootstrap():
    """Perfect probabilities give AUC 1 and a diagonal confusion matrix; bootstrap intervals bracket the value."""
    y = np.arange(40) % 4
    p = np.eye(4)[y] * 0.7 + 0.075
    pred = pd.DataFrame(p, columns=PROB_COLS).assign(fold=np.arange(40) // 10, stage_index=y, pred_index=y)
    m = stage_metrics(pred, n_boot=50)
    assert m["auc_macro"][0] == 1.0 and m["balanced_accuracy"][0] == 1.0 and m["confusion_C_C"] == 10
    assert m["confusion_A_B"] == 0 and m["f1_B"] == (1.0, 1.0, 1.0) and m["auc_macro_fold_mean"] == 1.0
    v, lo, hi = bootstrap(lambda i: float(np.mean(i < 20)), 40, n_boot=200)
    assert lo <= v <= hi and hi - lo > 0.05


def test_localisation_uses_patch_centres(tmp_path):
    """A patch is positive when its centre is in tumour or immune; AUC 1 for attention on exactly those patches."""
    tumour = np.zeros((8, 8), bool); tumour[:, :2] = True
    immune = np.zeros((8, 8), bool); immune[:, 6:] = True
    np.savez(tmp_path / "s.npz", tissue=np.ones((8, 8), bool), tumour=tumour, immune=immune, downsample=np.array(32))
    xy = np.array([[x, 0] for x in range(0, 224, 32)])
    truth = patch_truth(tmp_path / "s.npz", xy, 48)  # centres at x + 24
    assert truth.tolist() == [True, True, False, False, False, False, True]  # centres in mask columns 0..6
    write_attention(tmp_path / "run", "s", truth * 1.0 + 0.1, xy, 48)
    m, per = localisation_auc(tmp_path / "run", tmp_path, n_boot=10)
    assert m["localisation_auc"][0] == 1.0 and m["localisation_n_slides"] == 1


def test_oracle_cindex(tmp_path):
    """The oracle row is the C-index of the mean latent risk over a patient's slides."""
    lab = synthetic_bags(12).labels
    risk = -np.log(lab.survival_months.to_numpy())
    rows = [(f"{p}-S{j}", p, r + (0.01 if j else -0.01)) for p, r in zip(lab.index, risk) for j in range(2)]
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "latent_risk"]).to_csv(tmp_path / "truth.csv", index=False)
    c, lo, hi = oracle_cindex(tmp_path / "truth.csv", lab, n_boot=20)
    assert c == harrell_cindex(lab.survival_months, risk, lab.event) == 1.0


def test_train_cv_attention_model_end_to_end(cohort, tmp_path):
    """ABMIL on the planted stage signal: files written, AUC well above chance, attention per slide; repeatable."""
    out = tmp_path / "abmil"
    m = train_cv(cohort, cohort.parent / "features", "abmil", "stage", out, folds=3, seed=0, epochs=40, progress=False,
                 n_boot=100, hidden=32, attn_hidden=16, batch_size=8, lr=2e-3)
    for f in ("metrics.json", "predictions.csv", "splits.csv", "params.json", "figures/confusion_matrix.png",
              "figures/training_curves.png"):
        assert (out / f).is_file(), f
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:7]) == ["patient_id", "fold", *PROB_COLS, "pred"] and len(pred) == 32
    assert m["auc_macro"] > 0.75 and m["auc_macro_ci_low"] <= m["auc_macro"] <= m["auc_macro_ci_high"]
    assert json.loads((out / "metrics.json").read_text())["auc_macro"] == m["auc_macro"]
    assert len(list((out / "attention").glob("*.h5"))) == 32
    with h5py.File(out / "attention" / "p000-S1.h5") as f:
        assert len(f["attention"]) == len(f["coords"]) and f.attrs["fold"] in (0, 1, 2)
    train_cv(cohort, cohort.parent / "features", "abmil", "stage", tmp_path / "again", folds=3, seed=0, epochs=40,
             progress=False, n_boot=100, hidden=32, attn_hidden=16, batch_size=8, lr=2e-3, heatmaps=0)
    assert (tmp_path / "again" / "metrics.json").read_text() == (out / "metrics.json").read_text()  # same seed, same metrics
    assert pd.read_csv(tmp_path / "again" / "predictions.csv").equals(pred)


@pytest.fixture(scope="module")
def strong_cohort(tmp_path_factory):
    """48 patients whose survival follows the tumour share closely (hazard 8): with 32 patients and the default hazard
    a fold's C-index swings by +-0.08 between seeds, too much to tell a working model from a broken one."""
    return write_synthetic_cohort(tmp_path_factory.mktemp("mil48"), synthetic_bags(48, dim=16, seed=0, hazard=8))


def test_train_cv_deepattnmisl_and_meanpool_are_paired(strong_cohort, tmp_path):
    """DeepAttnMISL and the mean-pool Cox baseline on the same splits file both find the planted survival signal."""
    cohort = strong_cohort
    dam = train_cv(cohort, cohort.parent / "features", "deepattnmisl", "survival", tmp_path / "dam", folds=3, k=4,
                   progress=False, n_boot=100, heatmaps=0)
    mp = train_cv(cohort, cohort.parent / "features", "meanpool", "survival", tmp_path / "mp",
                  splits=tmp_path / "dam" / "splits.csv", progress=False, n_boot=100)
    assert pd.read_csv(tmp_path / "mp" / "splits.csv").equals(pd.read_csv(tmp_path / "dam" / "splits.csv"))
    # over cohort seeds 0-2 both reached 0.71-0.79 here; a model that learns nothing scores 0.5 +- 0.06
    assert dam["cindex"] > 0.65 and mp["cindex"] > 0.65, (dam["cindex"], mp["cindex"])
    pred = pd.read_csv(tmp_path / "dam" / "predictions.csv")
    assert {"patient_id", "fold", "risk", "group", "survival_months", "event"} <= set(pred.columns)
    assert (tmp_path / "dam" / "figures" / "km_risk_groups.png").is_file()
    assert len(list((tmp_path / "dam" / "attention").glob("*.h5"))) == 48
    c = compare_runs(tmp_path / "dam", tmp_path / "mp", n_boot=50)  # paired: the same patients in the same folds
    assert c["metric"] == "cindex" and c["n_patients"] == 48 and c["difference"][1] <= c["difference"][0] <= c["difference"][2]


def test_train_cv_bad_arguments(cohort, tmp_path):
    """Unknown model, task or hyperparameter: a WsiStudyError naming what is allowed."""
    with pytest.raises(WsiStudyError, match="unknown model"):
        train_cv(cohort, cohort.parent / "features", "transmil", "stage", tmp_path)
    with pytest.raises(WsiStudyError, match="unknown task"):
        train_cv(cohort, cohort.parent / "features", "abmil", "grade", tmp_path)
    with pytest.raises(WsiStudyError, match="unknown hyperparameters for abmil: k"):
        train_cv(cohort, cohort.parent / "features", "abmil", "stage", tmp_path, k=3)


def test_bench_mil_small():
    """The benchmark runs on a small synthetic cohort and reports both models' epoch times."""
    r = bench_mil(patients=12, patches=30, dim=16, k=4, batch_size=4, abmil_batches=2, device="cpu", progress=False)
    assert r["abmil_timed_batches"] == 2 and r["deepattnmisl_epoch_s"] >= 0 and r["abmil_epoch_s"] > 0


def test_cli_train_writes_the_contract_and_bad_input_exits_2(cohort, tmp_path):
    """`wsi-study train` as a user runs it: files and predictions.csv columns; a missing feature folder is exit 2."""
    import subprocess
    from conftest import CLI
    exe = [CLI, "-q", "train", str(cohort), "--features", str(cohort.parent / "features")]
    r = subprocess.run(exe + ["--model", "meanpool", "--task", "stage", "--out", str(tmp_path / "mp"), "--folds", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "auc_macro" in r.stdout and "balanced_accuracy" in r.stdout
    pred = pd.read_csv(tmp_path / "mp" / "predictions.csv")
    assert list(pred.columns[:7]) == ["patient_id", "fold", *PROB_COLS, "pred"] and pred.patient_id.is_unique
    assert set(pred.pred) <= set("ABCD")
    for f in ("metrics.json", "splits.csv", "figures/confusion_matrix.png"):
        assert (tmp_path / "mp" / f).is_file(), f
    r = subprocess.run(exe + ["--model", "maxpool", "--task", "survival", "--out", str(tmp_path / "max"), "--epochs", "3",
                              "--splits", str(tmp_path / "mp" / "splits.csv")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cindex" in r.stdout and list(pd.read_csv(tmp_path / "max" / "predictions.csv").columns[:3]) == ["patient_id", "fold", "risk"]
    r = subprocess.run([CLI, "train", str(cohort), "--features", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "nowhere" in r.stderr, r.stderr
    for bad, msg in ((["--epochs", "0"], "epochs must be a whole number of at least 1"),
                     (["--seed", "-1"], "seed must be a whole number of at least 0"),
                     (["--device", "tpu"], "is not a device name"),
                     (["--param", "nope=1"], "unknown hyperparameters for abmil: nope"),  # --param, checked before training
                     (["--param", "epochs=3"], "--param epochs: it has a flag of its own (--epochs)"),
                     (["--param", "lr"], "write NAME=VALUE")):
        r = subprocess.run(exe + ["--model", "abmil", "--task", "stage", "--out", str(tmp_path / "bad2"), *bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr
        assert not (tmp_path / "bad2" / "metrics.json").exists()
    r = subprocess.run(exe + ["--model", "meanpool", "--out", str(tmp_path / "pen"), "--folds", "3", "--param", "penalizer=0.5"],
                       capture_output=True, text=True)  # --param sets a hyperparameter
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "pen" / "params.json").read_text())["penalizer"] == 0.5


def test_cli_train_test_manifest_is_an_external_validation(cohort, tmp_path):
    """`train --test-manifest`: trained on the whole first cohort, predictions and metrics for the test cohort only;
    the flags that do not go with it are exit 2."""
    import shutil
    import subprocess
    from conftest import CLI
    shutil.copytree(cohort.parent, tmp_path / "dev")  # a copy: truth.csv is written beside it below
    cohort = tmp_path / "dev" / "manifest.csv"
    ext = write_synthetic_cohort(tmp_path / "ext", synthetic_bags(16, dim=16, seed=7))  # the same ids p000... as `cohort`
    exe = [CLI, "-q", "train", str(cohort), "--features", str(cohort.parent / "features"), "--model", "meanpool"]
    test = ["--test-manifest", str(ext), "--test-features", str(ext.parent / "features")]
    r = subprocess.run(exe + ["--task", "stage", "--out", str(tmp_path / "x"), *test], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pred, sp = pd.read_csv(tmp_path / "x" / "predictions.csv"), pd.read_csv(tmp_path / "x" / "splits.csv")
    assert sorted(pred.patient_id) == [f"p{i:03d}" for i in range(16)] and set(pred.fold) == {0}
    assert (sp.role != "test").sum() == 32 and sp[sp.role != "test"].patient_id.str.startswith("train:").all()
    m = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert m["folds"] == 1 and m["train_patients"] == 32 and m["auc_macro"] > 0.7, m
    for man in (cohort, ext):  # ground truth beside both manifests: the test cohort's scores, the training cohort's fits
        lab = pd.read_csv(man)  # the truth-Cox reference (a known latent risk: shorter survival, higher risk)
        lab.assign(latent_risk=-np.log(lab.survival_months), tumour_fraction=np.linspace(0, 1, len(lab)))[
            ["slide_id", "patient_id", "stage", "latent_risk", "tumour_fraction"]].to_csv(man.parent / "truth.csv", index=False)
    r = subprocess.run(exe + ["--out", str(tmp_path / "rep"), "--seeds", "0", "1", *test], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # with --seeds: one external validation per seed
    assert len(pd.read_csv(tmp_path / "rep" / "seed1" / "predictions.csv")) == 16
    runs = pd.read_csv(tmp_path / "rep" / "sweep.csv")
    assert runs.oracle_cindex.notna().all() and runs.truth_cox_cindex.notna().all(), runs.T
    (cohort.parent / "truth.csv").unlink()  # no training truth: nothing to fit the reference on, the rest stays
    r = subprocess.run(exe + ["--out", str(tmp_path / "one"), *test], capture_output=True, text=True)
    m = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert r.returncode == 0 and "oracle_cindex" in m and "truth_cox_cindex" not in m, r.stderr
    for bad, msg in ((test[:2], "needs both --test-manifest and --test-features"),
                     ([*test, "--folds", "3"], "--folds and --test-manifest exclude each other"),
                     ([*test, "--splits", str(tmp_path / "x" / "splits.csv")], "exclude each other"),
                     (["--test-manifest", str(ext), "--test-features", str(tmp_path / "nowhere")], "nowhere")):
        r = subprocess.run(exe + ["--out", str(tmp_path / "bad"), *bad], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr
        assert not (tmp_path / "bad" / "metrics.json").exists()


def test_cli_predict_applies_the_saved_model(cohort, tmp_path):
    """`predict MODEL MANIFEST`: the model.pt of an external validation reproduces its test predictions; bad input is exit 2."""
    import subprocess
    from conftest import CLI
    ext = write_synthetic_cohort(tmp_path / "ext", synthetic_bags(16, dim=16, seed=7))
    r = subprocess.run([CLI, "-q", "train", str(cohort), "--features", str(cohort.parent / "features"), "--model", "abmil",
                        "--task", "stage", "--epochs", "3", "--out", str(tmp_path / "x"), "--test-manifest", str(ext),
                        "--test-features", str(ext.parent / "features")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exe = [CLI, "-q", "predict", str(tmp_path / "x" / "model.pt"), str(ext), "--features", str(ext.parent / "features")]
    r = subprocess.run(exe + ["--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert r.returncode == 0 and "16 patients predicted, 16 with labels scored" in r.stdout and "auc_macro" in r.stdout, r.stderr
    shifted = json.loads((tmp_path / "p" / "metrics.json").read_text())["n_shifted"]
    assert (f"; {shifted} shifted (shift_score > 1) in predictions.csv" in r.stdout) == (shifted > 0), r.stdout
    a, b = (pd.read_csv(tmp_path / f / "predictions.csv") for f in ("x", "p"))
    assert a.patient_id.tolist() == b.patient_id.tolist() and np.allclose(a[PROB_COLS], b[PROB_COLS], atol=1e-5)
    assert np.allclose(a.shift_score, b.shift_score) and (b.shift_score > 0).all()  # the same check from model.pt alone
    wide = write_synthetic_cohort(tmp_path / "wide", synthetic_bags(4, dim=8))
    for args, msg in (([str(tmp_path / "none.pt"), str(ext), "--features", str(ext.parent / "features")], "no such model file"),
                      ([str(tmp_path / "x" / "model.pt"), str(wide), "--features", str(wide.parent / "features")], "D=8")):
        r = subprocess.run([CLI, "predict", *args, "--out", str(tmp_path / "bad")], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr, r.stderr


def test_cli_train_seeds_is_repeated_cross_validation(cohort, tmp_path):
    """`train --seeds`: one run per split seed, repeats.csv summarises them (ground-truth rows when truth.csv is there)."""
    import shutil
    import subprocess
    from conftest import CLI
    d = tmp_path / "cohort"
    shutil.copytree(cohort.parent, d)
    lab = pd.read_csv(d / "manifest.csv")  # a known latent risk: shorter survival, higher risk
    lab.assign(latent_risk=-np.log(lab.survival_months))[["slide_id", "patient_id", "latent_risk"]].to_csv(d / "truth.csv", index=False)
    exe = [CLI, "-q", "train", str(d / "manifest.csv"), "--features", str(d / "features"), "--model", "meanpool"]
    r = subprocess.run(exe + ["--out", str(tmp_path / "rep"), "--folds", "3", "--seeds", "0", "1", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = pd.read_csv(tmp_path / "rep" / "repeats.csv")
    assert rep.metric.tolist() == ["cindex", "latent_spearman", "oracle_cindex", "oracle_gap"] and set(rep.seeds) == {3}
    per_seed = [json.loads((tmp_path / "rep" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1, 2)]
    c = rep.set_index("metric")
    assert np.isclose(c.loc["cindex", "mean"], np.mean([m["cindex"] for m in per_seed]))
    assert np.isclose(c.loc["oracle_gap", "max"], max(m["oracle_gap"] for m in per_seed))
    assert len({m["cindex"] for m in per_seed}) > 1  # other splits, other scores
    assert "repeats.csv" in r.stdout and "oracle_gap" in r.stdout
    for extra in (["--seed", "1"], ["--splits", str(tmp_path / "rep" / "seed0" / "splits.csv")]):
        r = subprocess.run(exe + ["--out", str(tmp_path / "bad"), "--seeds", "0", "1", *extra], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "--seeds" in r.stderr, r.stderr
    # a second model over the same seeds: compare-seeds pairs them seed by seed and counts the seeds meeting a target
    exe2 = [CLI, "-q", "train", str(d / "manifest.csv"), "--features", str(d / "features"), "--model", "stage_cox"]
    r = subprocess.run(exe2 + ["--out", str(tmp_path / "stage"), "--folds", "3", "--seeds", "0", "1", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cmp = [CLI, "-q", "compare-seeds", str(tmp_path / "rep"), str(tmp_path / "stage"), "--out", str(tmp_path / "cmp")]
    r = subprocess.run(cmp + ["--reference", "stage", "--target", "oracle_gap<=0.05"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    paired = pd.read_csv(tmp_path / "cmp" / "repeats_paired.csv").set_index("model")
    other = pd.read_csv(tmp_path / "stage" / "sweep.csv").set_index("seed").cindex
    diff = np.array([m["cindex"] for m in per_seed]) - other.loc[[0, 1, 2]].to_numpy()
    assert np.isclose(paired.loc["rep", "diff_mean"], diff.mean()) and paired.loc["rep", "above"] == (diff > 0).sum()
    models = pd.read_csv(tmp_path / "cmp" / "repeats_models.csv").set_index("model")
    assert models.loc["rep", "oracle_gap<=0.05"] == sum(m["oracle_gap"] <= 0.05 for m in per_seed)
    assert "diff_mean" in r.stdout and (tmp_path / "cmp" / "figures" / "paired.png").is_file()
    r = subprocess.run(cmp + ["--reference", "stage", "--other-features", "--out", str(tmp_path / "cmp2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # the same patients and labels: --other-features pairs them the same way
    assert np.isclose(pd.read_csv(tmp_path / "cmp2" / "repeats_paired.csv").diff_mean[0], diff.mean())
    for bad, says in ((["--target", "gap"], "METRIC<=VALUE"), (["--reference", "nope"], "reference 'nope'")):
        r = subprocess.run(cmp + bad, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    r = subprocess.run([CLI, "-q", "compare-seeds", str(tmp_path / "rep"), str(tmp_path / "bad"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no sweep.csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # check-default: the same pair as one cohort; the verdict follows the paired difference, exit 1 when it fails
    chk = [CLI, "-q", "check-default", "--pair", str(tmp_path / "stage"), str(tmp_path / "rep"), "--out", str(tmp_path / "chk")]
    r = subprocess.run(chk + ["--max-localisation-drop", "none"], capture_output=True, text=True)
    verdict = json.loads((tmp_path / "chk" / "check.json").read_text())
    assert verdict["pass"] == (diff.mean() >= 0) and r.returncode == (0 if verdict["pass"] else 1), r.stderr
    assert np.isclose(pd.read_csv(tmp_path / "chk" / "check.csv").diff_mean[0], diff.mean())
    assert ("PASS" if verdict["pass"] else "FAIL") in r.stdout
    r2 = subprocess.run(chk + ["--max-localisation-drop", "none", "--other-features"], capture_output=True, text=True)
    assert r2.returncode == r.returncode and json.loads((tmp_path / "chk" / "check.json").read_text()) == verdict, r2.stderr
    for bad, says in (([], "no attention localisation"), (["--max-localisation-drop", "lots"], "give a number"),
                      (["--max-localisation-drop", "none", "--metric", "auc_macro"], "'auc_macro' is in none")):
        r = subprocess.run(chk + bad, capture_output=True, text=True)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    # --metric: the rule judged on another metric (the survival curves' IPA), paired the same way
    r = subprocess.run(chk + ["--max-localisation-drop", "none", "--metric", "ipa", "--min-mean-diff", "-1", "--min-positive", "0"],
                       capture_output=True, text=True)
    ipa = {n: pd.read_csv(tmp_path / n / "sweep.csv").set_index("seed").ipa.loc[[0, 1, 2]] for n in ("rep", "stage")}
    assert r.returncode == 0 and np.isclose(pd.read_csv(tmp_path / "chk" / "check.csv").diff_mean[0],
                                            (ipa["rep"] - ipa["stage"]).mean()), r.stderr
    # summarise-seeds: one row per folder, unpaired; the means and counts are those of each folder's own seeds
    summ = [CLI, "-q", "summarise-seeds", str(tmp_path / "rep"), str(tmp_path / "stage"), "--out", str(tmp_path / "sum")]
    r = subprocess.run(summ + ["--target", "oracle_gap<=0.05"], capture_output=True, text=True)
    assert r.returncode == 0 and "cohorts.csv" in r.stdout, r.stderr
    table = pd.read_csv(tmp_path / "sum" / "cohorts.csv")
    assert table.seeds.tolist() == [3, 3] and "oracle_cindex_mean" in table and "localisation_auc_mean" not in table
    assert np.isclose(table.cindex_mean[0], np.mean([m["cindex"] for m in per_seed]))
    assert table["oracle_gap<=0.05"][0] == sum(m["oracle_gap"] <= 0.05 for m in per_seed)
    r = subprocess.run(summ + ["--metric", "localisation"], capture_output=True, text=True)
    assert r.returncode == 2 and "metric 'localisation' is in none" in r.stderr, r.stderr


def test_ensemble_members_never_see_the_test_fold(cohort, tmp_path):
    """members > 1: every training patient validates once, test patients never train or validate; outputs as usual."""
    from wsi_study.evaluation.cv import member_splits
    bags = load_bags(cohort, cohort.parent / "features", task="stage")
    sp = make_splits(bags.labels, "stage", 4, seed=0)
    test = np.flatnonzero(np.isin(bags.patients, sp[(sp.fold == 0) & (sp.role == "test")].patient_id))
    fit = np.setdiff1d(np.arange(len(bags)), test)
    subs = member_splits(bags.labels, fit, test, "stage", 3)
    assert len(subs) == 3 and sorted(np.concatenate([s["val"] for s in subs]).tolist()) == fit.tolist()
    for s in subs:
        assert not set(s["train"]) & set(test) and not set(s["val"]) & set(test) and not set(s["train"]) & set(s["val"])
    m = train_cv(cohort, cohort.parent / "features", "deepattnmisl", "survival", tmp_path / "ens", folds=3, k=4, members=3,
                 epochs=20, progress=False, n_boot=50, heatmaps=0)
    pred = pd.read_csv(tmp_path / "ens" / "predictions.csv")
    assert len(pred) == 32 and pred.risk.notna().all() and 0 <= m["cindex"] <= 1
    hist = pd.read_csv(tmp_path / "ens" / "history.csv")
    assert sorted(hist.member.unique()) == [0, 1, 2]
    with h5py.File(tmp_path / "ens" / "attention" / "p000-S1.h5") as f:
        assert np.isfinite(f["attention"][:]).all() and len(f["attention"]) == len(f["coords"])


def test_cli_tune_sweeps_resumes_and_refuses_bad_grids(cohort, tmp_path):
    """`wsi-study tune`: one row per combination and split seed in sweep.csv, a re-run trains nothing new, a
    localisation floor nothing reaches is said, a bad --grid or an unknown hyperparameter is one line and exit 2."""
    import subprocess
    from conftest import CLI
    exe = [CLI, "-q", "tune", str(cohort), "--features", str(cohort.parent / "features"), "--model", "meanpool",
           "--out", str(tmp_path / "t"), "--folds", "3"]
    r = subprocess.run(exe + ["--grid", "pca=4,8", "--grid", "penalizer=0.1,1.0", "--seeds", "0", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runs = pd.read_csv(tmp_path / "t" / "sweep.csv")
    assert len(runs) == 8 and set(runs.seed) == {0, 1} and runs.cindex.between(0, 1).all()
    assert "best " in r.stdout and (tmp_path / "t" / "figures" / "sweep.png").is_file()
    mtime = (tmp_path / "t" / "sweep.csv").stat().st_mtime_ns
    r = subprocess.run(exe + ["--grid", "pca=4,8", "--grid", "penalizer=0.1,1.0", "--seeds", "0", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "t" / "sweep.csv").stat().st_mtime_ns == mtime  # nothing re-run
    r = subprocess.run(exe + ["--grid", "pca=4,8", "--grid", "penalizer=0.1,1.0", "--seeds", "0", "1",
                              "--min-localisation", "0.85"], capture_output=True, text=True)  # meanpool has no attention
    assert r.returncode == 0 and "no setting reached localisation AUC 0.85 on every seed" in r.stdout, r.stdout
    for grid, msg in ((["--grid", "pca"], "NAME=V1,V2"), (["--grid", "k=4"], "unknown hyperparameters for meanpool")):
        r = subprocess.run(exe + grid, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
