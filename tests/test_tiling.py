"""Tiling: the HDF5 contract, masks on real and synthetic slides, physical resolution, resume, bad input."""
import h5py
import numpy as np
import pandas as pd
import tifffile

from conftest import ROOT, run_cli
from wsi_study.tiling import read_tiles, tile_cohort, tile_slide

CMU = ROOT / "data" / "wsi" / "cmu_small_region.svs"


def test_tiles_file_contract(tmp_path):
    """coords are N×2 int64 level-0 top-lefts; the attributes CLAM/TRIDENT-style readers use are there."""
    row = tile_slide(CMU, tmp_path, "cmu", target_mpp=0.5, patch_size=224)
    with h5py.File(tmp_path / "cmu.h5", "r") as f:
        coords = f["coords"][:]
        attrs = dict(f.attrs)
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2 and len(coords) == row["n_patches"] > 20
    for key in ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp", "overlap"):
        assert key in attrs, key
    assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == round(224 * 0.5 / 0.499)
    size0 = attrs["patch_size_level0"]
    assert (coords[:, 0] + size0 <= 2220).all() and (coords[:, 1] + size0 <= 2967).all() and (coords % 1 == 0).all()
    assert (tmp_path / "masks" / "cmu.png").is_file() and (tmp_path / "thumbnails" / "cmu.jpg").is_file()


def test_physical_resolution_and_overlap(tmp_path):
    """At 1 µm/px a 224-px patch covers ~449 level-0 px; overlap shrinks the stride."""
    tile_slide(CMU, tmp_path, "a", target_mpp=1.0, patch_size=224, min_tissue=0.0)
    tile_slide(CMU, tmp_path, "b", target_mpp=1.0, patch_size=224, overlap=112, min_tissue=0.0)
    ca, aa = read_tiles(tmp_path / "a.h5")
    cb, _ = read_tiles(tmp_path / "b.h5")
    assert aa["patch_size_level0"] == 449
    assert np.diff(np.unique(ca[:, 0]))[0] == 449 and np.diff(np.unique(cb[:, 0]))[0] == 224
    assert len(cb) > 3 * len(ca)


def test_patches_lie_on_tissue(tiny_cohort, tmp_path):
    """On the synthetic cohort, kept patches fall on the generator's ground-truth tissue."""
    folder = tiny_cohort.parent
    m = pd.read_csv(tiny_cohort)
    m = m[m.slide_id.str.startswith("demo-")]
    t = tile_cohort(tiny_cohort, tmp_path, target_mpp=0.5, patch_size=128, progress=False)
    assert (t.status == "ok").all()
    for sid in m.slide_id:
        coords, attrs = read_tiles(tmp_path / f"{sid}.h5")
        truth = np.load(folder / "truth" / f"{sid}.npz")
        ds, tissue = float(truth["downsample"]), truth["tissue"]
        s = max(1, round(attrs["patch_size_level0"] / ds))
        frac = np.array([tissue[y // int(ds): y // int(ds) + s, x // int(ds): x // int(ds) + s].mean() for x, y in coords])
        # every kept patch is mostly tissue by the generator's own mask (the masker sees only an 8 µm/px thumbnail)
        assert len(coords) > 0 and frac.mean() > 0.7 and (frac > 0.1).all(), (sid, frac.mean(), frac.min())


def blank_slide(path, size=2048, mpp=0.5):
    """A pyramidal TIFF of bare glass (near-white noise)."""
    rng = np.random.default_rng(0)
    img = (238 + rng.integers(-3, 4, (size, size, 3))).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level in range(3):
            sub = img[:: 4 ** level, :: 4 ** level]
            res = 1e4 / (mpp * 4 ** level)
            tif.write(sub, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if level else 0,
                      resolution=(res, res), resolutionunit="CENTIMETER")


def test_no_tissue_gives_zero_patches(tmp_path, capfd):
    """A slide of bare glass is not a crash: zero patches and a warning naming it."""
    blank_slide(tmp_path / "glass.tiff")
    row = tile_slide(tmp_path / "glass.tiff", tmp_path / "tiles", "glass", mpp=0.5)
    assert row["n_patches"] == 0
    assert read_tiles(tmp_path / "tiles" / "glass.h5")[0].shape == (0, 2)
    assert "slide glass: no tissue found" in capfd.readouterr().err


def test_cli_errors_and_resume(tmp_path, shared):
    """Upsampling, no mpp and unreadable slides are reported per slide with exit 2; finished slides are skipped."""
    (tmp_path / "junk.svs").write_text("junk")
    (tmp_path / "m.csv").write_text(
        "slide_id,patient_id,path,mpp\n"
        f"cmu,p1,{CMU},\n"
        f"tcga,p2,{shared / 'tcga-cr-7395-01a-01-ts1.svs'},\n"
        f"tcga_mpp,p3,{shared / 'tcga-cr-7395-01a-01-ts1.svs'},0.5\n"
        "junk,p4,junk.svs,\n")
    out = tmp_path / "tiles"
    res = run_cli("-q", "tile", tmp_path / "m.csv", "--out", out, "--mpp", "0.5", "--scheduler", "none")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "slide tcga " in res.stderr and "add an mpp column" in res.stderr
    assert "junk.svs: cannot be opened" in res.stderr
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures.slide_id) == ["junk", "tcga"] and set(failures.stage) == {"tile"}
    assert (out / "cmu.h5").is_file() and (out / "tcga_mpp.h5").is_file()
    res = run_cli("-q", "tile", tmp_path / "m.csv", "--out", out, "--mpp", "0.25", "--scheduler", "none")
    assert "finer than the slide's level 0" in res.stderr and "--allow-upsample" in res.stderr
    res = run_cli("-q", "tile", tmp_path / "m.csv", "--out", out, "--mpp", "0.5", "--scheduler", "none")
    table = pd.read_csv(out / "tiles.csv")
    assert table.set_index("slide_id").status.to_dict() == {"cmu": "skipped", "tcga": "failed",
                                                            "tcga_mpp": "skipped", "junk": "failed"}
    res = run_cli("tile", tmp_path / "m.csv", "--out", out, "--min-tissue", "2")
    assert res.returncode == 2 and "--min-tissue must be a fraction" in res.stderr


def test_allow_upsample(tmp_path):
    row = tile_slide(CMU, tmp_path, "up", target_mpp=0.25, patch_size=224, allow_upsample=True)
    assert row["patch_size_level0"] == round(224 * 0.25 / 0.499)


def test_fluorescence_slide_masks_the_tissue(tmp_path, capfd):
    """A real fluorescence slide (Hamamatsu NDPI, DAPI: bright nuclei on a dark background): the mask keeps the bright
    tissue, not the dark background the bright-field maskers would keep, and a warning names the slide."""
    from PIL import Image
    row = tile_slide(ROOT / "data" / "wsi" / "hamamatsu_fluorescence_DAPI.ndpi", tmp_path, "dapi", target_mpp=2.0)
    err = capfd.readouterr().err
    assert "slide dapi: its background is dark" in err, err[-2000:]
    mask = np.asarray(Image.open(tmp_path / "masks" / "dapi.png")) > 0
    grey = np.asarray(Image.open(tmp_path / "thumbnails" / "dapi.jpg").convert("L").resize(mask.shape[::-1]), float)
    assert 0.05 < mask.mean() < 0.8, mask.mean()  # the whole frame had come back as "tissue" (0.93)
    assert grey[mask].mean() > 2 * grey[~mask].mean()  # the kept part is the bright (stained) one
    assert row["n_patches"] > 0 and read_tiles(tmp_path / "dapi.h5")[1]["dark_background"]
