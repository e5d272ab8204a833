"""Manifest validation: every bad-input case gets one line naming row, column and value, and exit code 2."""
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from wsi_study.core import ManifestError
from wsi_study.manifest import validate_manifest

CMU = ROOT / "data" / "wsi" / "cmu_small_region.svs"
HEADER = "slide_id,patient_id,path,stage,survival_months,event,mpp\n"


@pytest.fixture
def folder(tmp_path):
    shutil.copy(CMU, tmp_path / "a.svs")
    shutil.copy(CMU, tmp_path / "b.svs")
    (tmp_path / "adir").mkdir()
    return tmp_path


def check(folder, body, expected, header=HEADER, open_slides=False):
    "Validate a manifest from the CLI and from Python; both must report `expected` in one line."
    m = folder / "m.csv"
    m.write_text(header + body)
    args = ["validate", m] + ([] if open_slides else ["--no-open"])
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if expected in l]
    assert len(lines) == 1, res.stderr
    assert str(m) in res.stderr
    with pytest.raises(ManifestError) as e:
        validate_manifest(m, open_slides=open_slides)
    assert any(expected in p for p in e.value.problems)
    return e.value.problems


def test_good_manifest_passes(folder):
    """A clean manifest validates with exit 0, opening the slides."""
    (folder / "m.csv").write_text(HEADER + "s1,p1,a.svs,A,10.5,1,\ns2,p1,b.svs,A,10.5,1,0.25\n")
    res = run_cli("validate", folder / "m.csv")
    assert res.returncode == 0, res.stderr
    assert "2 slides from 1 patients" in res.stdout
    df = validate_manifest(folder / "m.csv")
    assert df.path.map(Path.is_absolute).all() and df.mpp.isna().tolist() == [True, False]


def test_missing_file(tmp_path):
    """A manifest that does not exist."""
    res = run_cli("validate", tmp_path / "nope.csv")
    assert res.returncode == 2 and "manifest not found" in res.stderr and "Traceback" not in res.stderr


def test_empty_csv(folder):
    """An empty file and a header without rows."""
    check(folder, "", "the file is empty", header="")
    check(folder, "", "has a header but no slide rows")


def test_unreadable_csv(folder):
    """Binary garbage is not a CSV."""
    (folder / "m.csv").write_bytes(b"\xff\xfe\x00\x81garbage\x00\n\x9f")
    res = run_cli("validate", folder / "m.csv", "--no-open")
    assert res.returncode == 2 and "not a readable CSV" in res.stderr


def test_missing_required_column(folder):
    """Each missing required column is named."""
    problems = check(folder, "s1,a.svs\n", "missing required column 'patient_id'", header="slide_id,path\n")
    assert len(problems) == 1


def test_missing_slide_file(folder):
    check(folder, "s1,p1,gone.svs,A,10,1,\n", "row 2, column 'path': file not found")


def test_path_is_directory(folder):
    check(folder, "s1,p1,adir,A,10,1,\n", "is a folder, not a slide file")


def test_duplicate_slide_id(folder):
    check(folder, "s1,p1,a.svs,A,10,1,\ns1,p2,b.svs,B,5,0,\n", "rows 2, 3: duplicate slide_id 's1'")


def test_patient_disagrees(folder):
    problems = check(folder, "s1,p1,a.svs,A,10,1,\ns2,p1,b.svs,B,12,0,\n", "patient 'p1' has slides that disagree on stage")
    assert sum("disagree" in p for p in problems) == 3  # stage, survival_months and event


@pytest.mark.parametrize("value", ["0", "-2", "soon", "inf"])
def test_bad_survival(folder, value):
    check(folder, f"s1,p1,a.svs,A,{value},1,\n", f"row 2, column 'survival_months': '{value}' is not a positive number")


@pytest.mark.parametrize("value", ["2", "yes", "0.5"])
def test_bad_event(folder, value):
    check(folder, f"s1,p1,a.svs,A,10,{value},\n", f"column 'event': '{value}' is not 0 (censored) or 1")


@pytest.mark.parametrize("value", ["E", "stage2"])
def test_bad_stage(folder, value):
    check(folder, f"s1,p1,a.svs,{value},10,1,\n", f"column 'stage': '{value}' is not one of A, B, C, D")


@pytest.mark.parametrize("value", ["0", "-0.5", "fine"])
def test_bad_mpp(folder, value):
    check(folder, f"s1,p1,a.svs,A,10,1,{value}\n", f"column 'mpp': '{value}' is not a positive number of µm per pixel")


def test_survival_without_event(folder):
    check(folder, "s1,p1,a.svs,A,10,,\n", "survival_months and event go together")


def test_all_problems_in_one_pass(folder):
    """Several problems come back together, one line each."""
    problems = check(folder, "s1,p1,gone.svs,E,-1,3,0\n", "file not found")
    assert len(problems) == 5  # path, stage, survival, event, mpp


def test_unopenable_and_no_mpp_slides(shared, tmp_path):
    """Opening the slides adds the real DICOM that no reader opens and the TCGA slide without an mpp."""
    body = (f"dicom,p1,{shared / 'pathml_small_dicom_sm.dcm'},A,10,1,\n"
            f"tcga,p2,{shared / 'tcga-cr-7395-01a-01-ts1.svs'},B,10,1,\n"
            f"tcga_ok,p3,{shared / 'tcga-cr-7395-01a-01-ts1.svs'},B,10,1,0.5\n"
            f"fake,p4,{tmp_path / 'fake.svs'},B,10,1,\n")
    (tmp_path / "fake.svs").write_bytes(b"not a slide at all")
    problems = check(tmp_path, body, "slide 'dicom'", open_slides=True)
    text = "\n".join(problems)
    assert "slide 'dicom'" in text and "cannot be opened" in text
    assert "slide 'tcga'" in text and "add an mpp column" in text
    assert "slide 'fake'" in text and "cannot be opened" in text
    assert "tcga_ok" not in text
    res = run_cli("validate", tmp_path / "m.csv", "--no-open")
    assert res.returncode == 0, res.stderr
