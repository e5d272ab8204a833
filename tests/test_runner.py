"""The papermill study runner end to end on a tiny cohort: outputs, provenance, a failing study, several cohorts."""
import json

import nbformat
import pandas as pd

from conftest import ROOT, run_cli

QC = ROOT / "nbs" / "studies" / "00_cohort_qc.ipynb"


def failing_notebook(path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("cohort = ''\nmanifest = ''\nout_dir = ''\nseed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("raise RuntimeError('this study fails on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)


def test_run_two_cohorts_with_a_failing_study(tmp_path, tiny_cohort):
    """Both cohorts get every study; the failure names its executed notebook; the exit code is non-zero."""
    cfg = tmp_path / "configs"
    (cfg / "cohorts").mkdir(parents=True)
    failing_notebook(cfg / "boom.ipynb")
    (cfg / "study.yaml").write_text(
        f"studies:\n  - {{name: 00_cohort_qc, notebook: {QC}, params: {{thumb_size: 96}}}}\n"
        f"  - {{name: 99_boom, notebook: boom.ipynb}}\n")
    (cfg / "cohorts" / "tiny.yaml").write_text(f"name: tiny\nmanifest: {tiny_cohort}\n")
    # the second cohort does not exist yet: the runner builds it from its `demo` section
    (cfg / "cohorts" / "built.yaml").write_text(
        "name: built\nmanifest: ../../built/manifest.csv\ndemo: {patients: 3, size: 768, seed: 5}\n")
    out = tmp_path / "results"
    res = run_cli("-q", "run", cfg / "study.yaml", "--cohort", "tiny", "--cohort", "built", "--out", out)
    assert res.returncode == 1, res.stderr
    for cohort in ("tiny", "built"):
        qc = out / cohort / "00_cohort_qc"
        assert (qc / "00_cohort_qc.ipynb").is_file()
        for fig in ("thumbnails", "km_by_stage", "stage_followup", "sizes_mpp"):
            assert (qc / "figures" / f"{fig}.png").stat().st_size > 2000, fig
        slides = pd.read_csv(qc / "tables" / "slides.csv")
        metrics = json.loads((qc / "metrics.json").read_text())
        assert metrics["n_slides"] == len(slides) and list(metrics) == sorted(metrics)
        assert 0 <= metrics["km_logrank_p"] <= 1
        run = json.loads((out / cohort / "run.json").read_text())
        assert [s["status"] for s in run["studies"]] == ["ok", "failed"]
        assert run["packages"]["tiatoolbox"] and "git_sha" in run
        assert all(s["wall_s"] > 0 and s["peak_mem_mb"] > 0 for s in run["studies"])
        assert run["studies"][0]["parameters"]["thumb_size"] == 96
        summary = pd.read_csv(out / cohort / "summary.csv")
        assert set(summary.study) == {"00_cohort_qc"} and "n_slides" in set(summary.metric)
        failed = out / cohort / "99_boom" / "99_boom.ipynb"
        assert f"study '99_boom' failed on cohort '{cohort}'" in res.stderr and str(failed) in res.stderr
        assert failed.is_file()
    assert (tmp_path / "built" / "manifest.csv").is_file()
    # the real CMU slide is in the tiny cohort, unlabelled, with its metadata mpp
    slides = pd.read_csv(out / "tiny" / "00_cohort_qc" / "tables" / "slides.csv")
    assert (slides.mpp_source == "metadata").all() and slides.error.isna().all()


def test_only_and_bad_configs(tmp_path, tiny_cohort):
    """--only picks studies; an unknown study, cohort or key is a one-line ConfigError with exit 2."""
    cfg = tmp_path / "configs"
    (cfg / "cohorts").mkdir(parents=True)
    failing_notebook(cfg / "boom.ipynb")
    (cfg / "study.yaml").write_text(f"studies:\n  - {{name: qc, notebook: {QC}}}\n  - {{name: boom, notebook: boom.ipynb}}\n")
    (cfg / "cohorts" / "tiny.yaml").write_text(f"name: tiny\nmanifest: {tiny_cohort}\n")
    res = run_cli("-q", "run", cfg / "study.yaml", "--cohort", "tiny", "--only", "qc", "--out", tmp_path / "r",
                  "--param", "max_thumbnails=3")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "r" / "tiny" / "boom").exists()
    run = json.loads((tmp_path / "r" / "tiny" / "run.json").read_text())
    assert run["studies"][0]["parameters"]["max_thumbnails"] == 3  # --param reaches the study that declares it
    bad = {
        ("--only", "nope"): "no study named nope",
        ("--cohort", "absent"): "config file not found",
        ("--seed", "-1"): "--seed must be a whole number of at least 0",
        ("--param", "max_thumbnails"): "write NAME=VALUE",
        ("--param", "max_thumbnail=3"): "--param max_thumbnail: no study run here declares it",
    }
    for extra, msg in bad.items():
        args = ["run", cfg / "study.yaml", "--out", tmp_path / "r2", *extra]
        if extra[0] != "--cohort":
            args += ["--cohort", "tiny"]
        res = run_cli(*args)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr
    (cfg / "cohorts" / "typo.yaml").write_text(f"name: typo\nmanifest: {tiny_cohort}\nparms: {{}}\n")
    res = run_cli("run", cfg / "study.yaml", "--cohort", "typo")
    assert res.returncode == 2 and "unknown key 'parms'" in res.stderr and "typo.yaml" in res.stderr
    (cfg / "bad.yaml").write_text("studies:\n  - {name: x, notebook: missing.ipynb}\n")
    res = run_cli("run", cfg / "bad.yaml", "--cohort", "tiny")
    assert res.returncode == 2 and "notebook not found" in res.stderr


def test_project_configs_are_valid():
    """The shipped study list and cohort configs load."""
    from wsi_study.core import load_cohort
    from wsi_study.runner import load_studies
    assert [s["name"] for s in load_studies(ROOT / "configs" / "study.yaml")][0] == "00_cohort_qc"
    demo = load_cohort("demo", configs_dir=ROOT / "configs")
    assert demo["manifest"].endswith("data/demo/manifest.csv") and demo["demo"]["patients"] == 40


def test_unlabelled_cohort_runs_and_skips_the_model_studies(tmp_path):
    """The project's study config on a cohort of real slides without stage or follow-up (the manifest has an mpp
    column): QC, tiling and embedding run; the three model studies are recorded as skipped, and the run exits 0."""
    cmu = ROOT / "data" / "wsi" / "cmu_small_region.svs"
    (tmp_path / "m.csv").write_text(f"slide_id,patient_id,path,mpp\na,p1,{cmu},\nb,p2,{cmu},0.499\n")
    (tmp_path / "real.yaml").write_text(f"name: real\nmanifest: {tmp_path / 'm.csv'}\nparams: {{}}\n")
    res = run_cli("-q", "run", ROOT / "configs" / "study.yaml", "--cohort", tmp_path / "real.yaml", "--out", tmp_path / "r")
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((tmp_path / "r" / "real" / "run.json").read_text())
    status = {s["name"]: s["status"] for s in run["studies"]}
    assert status == {"00_cohort_qc": "ok", "10_tiling": "ok", "20_embedding": "ok", "30_deepattnmisl_survival": "skipped",
                      "31_stage": "skipped", "32_mil_baselines": "skipped"}, status
    assert "no patient has survival_months and event" in res.stderr
    assert (tmp_path / "r" / "real" / "00_cohort_qc" / "figures" / "thumbnails.png").is_file()
    assert not (tmp_path / "r" / "real" / "00_cohort_qc" / "figures" / "stage_followup.png").exists()
    summary = pd.read_csv(tmp_path / "r" / "real" / "summary.csv")
    assert set(summary.study) == {"00_cohort_qc", "10_tiling", "20_embedding"}
