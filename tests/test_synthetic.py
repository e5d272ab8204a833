"""The demo cohort generator: real pyramidal TIFFs that openslide and TIAToolbox read, determinism, bad arguments."""
import hashlib

import numpy as np
import openslide
import pandas as pd
import pytest

from conftest import run_cli
from wsi_study.core import WsiStudyError
from wsi_study.manifest import validate_manifest
from wsi_study.slides import open_slide, slide_info
from wsi_study.synthetic import make_demo_cohort


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical(tmp_path):
    """Same seed → byte-identical files; another seed → different slides."""
    a = make_demo_cohort(tmp_path / "a", patients=3, size=1024, seed=3, progress=False).parent
    b = make_demo_cohort(tmp_path / "b", patients=3, size=1024, seed=3, progress=False).parent
    c = make_demo_cohort(tmp_path / "c", patients=3, size=1024, seed=4, progress=False).parent
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_cohort_is_valid_and_readable(tiny_cohort):
    """The manifest validates (slides opened) and every TIFF is a pyramid with mpp for openslide and TIAToolbox."""
    m = validate_manifest(tiny_cohort)
    synth = m[m.slide_id.str.startswith("demo-")]
    assert len(synth) >= 4 and set(synth.stage) <= set("ABCD")
    assert (synth.survival_months > 0).all() and set(synth.event) <= {0, 1}
    assert m[~m.slide_id.str.startswith("demo-")].stage.isna().all()  # the real slide is unlabelled
    for path in synth.path:
        osr = openslide.OpenSlide(str(path))
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_count >= 3 and float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
        assert osr.dimensions == (1024, 1024)
        info = slide_info(path)
        assert info["mpp_source"] == "metadata" and info["mpp"] == pytest.approx(0.5, rel=1e-3)
        region = open_slide(path).read_rect((0, 0), (256, 256), resolution=1.0, units="mpp")
        assert region.shape == (256, 256, 3) and region.std() > 1  # real pixels, not a blank page


def test_ground_truth(tiny_cohort):
    """Masks and latent risk per slide, consistent with the manifest."""
    folder = tiny_cohort.parent
    truth = pd.read_csv(folder / "truth.csv")
    m = pd.read_csv(tiny_cohort)
    assert set(truth.slide_id) == set(m.slide_id[m.slide_id.str.startswith("demo-")])
    assert truth.latent_risk.notna().all()
    z = np.load(folder / "truth" / f"{truth.slide_id[0]}.npz")
    assert {"tissue", "tumour", "immune"} <= set(z.files)
    assert z["tumour"].any() and (z["tumour"] <= z["tissue"]).all()


@pytest.mark.parametrize("args,msg", [(["--patients", "0"], "patients"), (["--size", "10"], "size"),
                                      (["--mpp", "-1"], "mpp")])
def test_bad_arguments(tmp_path, args, msg):
    res = run_cli("demo-data", tmp_path / "x", *args)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(WsiStudyError):
        make_demo_cohort(tmp_path / "y", **{args[0][2:]: float(args[1]) if "mpp" in args[0] else int(args[1])})
