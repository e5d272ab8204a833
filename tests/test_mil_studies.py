"""The MIL study notebooks (30, 31, 32) run by the papermill runner on a small cohort of feature files."""
import json
import shutil

import pandas as pd

from conftest import ROOT, run_cli
from wsi_study.evaluation.cv import write_synthetic_cohort
from wsi_study.models.bags import synthetic_bags

STUDIES = ROOT / "nbs" / "studies"


def small_cohort(tmp_path, drop=()):
    """24 synthetic patients' feature files where the embedding study would put them, and a cohort config `small`
    (its manifest without the columns in `drop`); returns the results root and the configs folder."""
    man = write_synthetic_cohort(tmp_path / "cohort", synthetic_bags(24, dim=16, seed=2))
    pd.read_csv(man).drop(columns=list(drop)).to_csv(man, index=False)
    out = tmp_path / "results"
    feats = out / "small" / "features" / "0.5mpp_224px_0px" / "efficientnet_lite0"
    feats.parent.mkdir(parents=True)
    shutil.move(tmp_path / "cohort" / "features", feats)
    cfg = tmp_path / "configs"
    (cfg / "cohorts").mkdir(parents=True)
    (cfg / "cohorts" / "small.yaml").write_text(f"name: small\nmanifest: {man}\n")
    return out, cfg


def run_small(out, cfg, studies: dict) -> list[str]:
    "Run the study notebooks `studies` (name → their params) on the cohort `small`; each study's status in run.json."
    (cfg / "study.yaml").write_text("studies:\n" + "".join(
        f"  - {{name: {n}, notebook: {STUDIES / (n + '.ipynb')}, params: {{{p}}}}}\n" for n, p in studies.items()))
    res = run_cli("-q", "run", cfg / "study.yaml", "--cohort", "small", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return [s["status"] for s in json.loads((out / "small" / "run.json").read_text())["studies"]]


def test_mil_studies_end_to_end(tmp_path):
    """Shared splits, DeepAttnMISL and baselines on the same folds, the comparison table and figure, metrics."""
    out, cfg = small_cohort(tmp_path)
    quick = "folds: 3, epochs: 6, n_boot: 50, members: 2"
    status = run_small(out, cfg, {"30_deepattnmisl_survival": f"{quick}, k: 4", "31_stage": f"{quick}, k: 4",
                                  "32_mil_baselines": f"{quick}, models: [abmil, meanpool]"})
    assert status == ["ok", "ok", "ok"]
    base = out / "small" / "32_mil_baselines"
    table = pd.read_csv(base / "tables" / "model_comparison.csv")
    assert set(zip(table.task, table.model)) == {(t, m) for t in ("survival", "stage") for m in ("DeepAttnMISL", "abmil", "meanpool")}
    assert ((table.ci_low <= table.value) & (table.value <= table.ci_high)).all()
    assert table[table.model != "DeepAttnMISL"].diff_vs_ref.notna().all()  # paired against DeepAttnMISL
    assert (base / "figures" / "model_comparison.png").stat().st_size > 5000
    # every model of a task ran on the one shared splits file
    for task, dam in (("survival", "30_deepattnmisl_survival"), ("stage", "31_stage")):
        shared = pd.read_csv(out / "small" / "splits" / f"{task}_3fold_seed0.csv")
        for run_dir in (out / "small" / dam, base / "runs" / f"abmil_{task}", base / "runs" / f"meanpool_{task}"):
            assert pd.read_csv(run_dir / "splits.csv").equals(shared), run_dir
    m30 = json.loads((out / "small" / "30_deepattnmisl_survival" / "metrics.json").read_text())
    assert 0 <= m30["cindex"] <= 1 and m30["n_patients"] == 24
    pred = pd.read_csv(out / "small" / "31_stage" / "predictions.csv")
    assert list(pred.columns[:7]) == ["patient_id", "fold", "prob_A", "prob_B", "prob_C", "prob_D", "pred"]
    summary = pd.read_csv(out / "small" / "summary.csv")
    assert {"30_deepattnmisl_survival", "31_stage", "32_mil_baselines"} <= set(summary.study)


def test_survival_only_cohort(tmp_path):
    """A manifest with follow-up but no stage: the stage study is skipped, 32 compares the survival models and leaves
    out the stage-alone reference, which has no stage to use."""
    out, cfg = small_cohort(tmp_path, drop=["stage"])
    quick = "folds: 3, epochs: 4, n_boot: 20, members: 2"
    status = run_small(out, cfg, {"31_stage": f"{quick}, k: 4", "32_mil_baselines": f"{quick}, models: [meanpool, stage_cox]"})
    assert status == ["skipped", "ok"]
    table = pd.read_csv(out / "small" / "32_mil_baselines" / "tables" / "model_comparison.csv")
    assert set(zip(table.task, table.model)) == {("survival", "meanpool")}


def test_mil_study_without_features_says_what_to_run(tmp_path):
    """A MIL study run before the embedding study fails with the study to run, not a traceback from deep inside."""
    man = write_synthetic_cohort(tmp_path / "cohort", synthetic_bags(8, dim=4))
    cfg = tmp_path / "configs"
    (cfg / "cohorts").mkdir(parents=True)
    (cfg / "cohorts" / "small.yaml").write_text(f"name: small\nmanifest: {man}\n")
    (cfg / "study.yaml").write_text(
        f"studies:\n  - {{name: 31_stage, notebook: {STUDIES / '31_stage.ipynb'}}}\n")
    res = run_cli("-q", "run", cfg / "study.yaml", "--cohort", "small", "--out", tmp_path / "r")
    assert res.returncode == 1
    executed = (tmp_path / "r" / "small" / "31_stage" / "31_stage.ipynb").read_text()
    assert "run the 20_embedding study first" in executed


def test_slide_whose_embedding_failed_is_left_out(tmp_path):
    """A cohort with one unreadable slide: the embedding study recorded it in failures.csv, and the model studies go on
    without it (its patient drops out) instead of failing; the executed notebook names it."""
    out, cfg = small_cohort(tmp_path)
    feats = out / "small" / "features" / "0.5mpp_224px_0px" / "efficientnet_lite0"
    (feats / "p003-S1.h5").unlink()
    (feats.parent / "failures.csv").write_text("slide_id,stage,error\np003-S1,embed,p003.svs: cannot be read\n")
    quick = "folds: 3, epochs: 3, n_boot: 20, members: 1"
    assert run_small(out, cfg, {"30_deepattnmisl_survival": f"{quick}, k: 4",
                                "32_mil_baselines": f"{quick}, models: [meanpool], tasks: [survival]"}) == ["ok", "ok"]
    m30 = json.loads((out / "small" / "30_deepattnmisl_survival" / "metrics.json").read_text())
    assert m30["n_patients"] == 23
    assert "p003" not in set(pd.read_csv(out / "small" / "30_deepattnmisl_survival" / "predictions.csv").patient_id)
    assert "1 slides left out, their embedding failed" in (out / "small" / "30_deepattnmisl_survival" /
                                                            "30_deepattnmisl_survival.ipynb").read_text()
