"""Encoders and the feature store: file contract, determinism, a real SIGKILL and resume, bad slides, offline hub names."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from conftest import run_cli
from wsi_study.core import WsiStudyError
from wsi_study.embedding import embed_cohort, embed_slide, feature_path, PatchDataset
from wsi_study.encoders import load_encoder, file_sha256

ROOT = Path(__file__).resolve().parent.parent
CMU = ROOT / "data" / "wsi" / "cmu_small_region.svs"  # real H&E, 2220×2967 px, 0.499 µm/px, 1 level
FAST = "random:mobilenetv3_small_050"  # a cheap encoder where the encoder itself is not under test


def write_tiles(path, coords, patch_size=224, target_mpp=0.5, level0_mpp=0.499):
    "A tiles file as the tiling stage writes it."
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        f.attrs.update(patch_size=patch_size, patch_size_level0=int(round(patch_size * target_mpp / level0_mpp)),
                       target_mpp=target_mpp, level0_mpp=level0_mpp, overlap=0)
    return Path(path)


def temps(folder, name):
    "Temporary files `atomic_path` left in `folder` for the file `name`."
    return [p for p in Path(folder).iterdir() if p.name.startswith(f".{name}") and p.name.endswith(".tmp")]


def grid(n, step=224, size=224):
    "The first `n` top-left corners of a grid over the CMU slide."
    xy = [(x, y) for y in range(0, 2967 - size + 1, step) for x in range(0, 2220 - size + 1, step)]
    assert len(xy) >= n
    return np.array(xy[:n], dtype=np.int64)


def cohort(tmp_path, slides):
    "A manifest CSV plus tiles files: `slides` maps slide_id → (slide path, coords or None for no tiles file)."
    (tmp_path / "tiles").mkdir(exist_ok=True)
    rows = []
    for i, (sid, (path, coords)) in enumerate(slides.items()):
        rows.append({"slide_id": sid, "patient_id": f"p{i}", "path": str(path)})
        if coords is not None:
            write_tiles(tmp_path / "tiles" / f"{sid}.h5", coords)
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def test_feature_file_contract(tmp_path):
    "A feature file has N×D float32 features, the tiles' coords, and the attributes CLAM and TRIDENT readers use."
    manifest = cohort(tmp_path, {"cmu": (CMU, grid(32))})
    t = embed_cohort(manifest, tmp_path / "tiles", tmp_path / "features", "efficientnet_lite0", batch_size=16,
                     progress=False)
    assert list(t.columns[:5]) == ["slide_id", "n_patches", "seconds", "patches_per_s", "status"]
    assert t.status.tolist() == ["ok"] and t.n_patches.tolist() == [32]
    p = tmp_path / "features" / "efficientnet_lite0" / "cmu.h5"
    assert feature_path(tmp_path / "features", "efficientnet_lite0", "cmu") == p
    with h5py.File(p) as f:  # how CLAM's dataset reads them
        feats, coords = f["features"][:], f["coords"][:]
    assert feats.shape == (32, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert coords.dtype == np.int64 and (coords == grid(32)).all()
    with h5py.File(p, "r") as f:
        a = dict(f.attrs)
        assert a["encoder"] == "efficientnet_lite0" and a["n_patches"] == 32
        assert a["weights_sha256"].startswith("57934424")  # the checksum torch hub put in the weights' file name
        assert (a["mpp"], a["target_mpp"], a["level0_mpp"], a["patch_size"], a["patch_size_level0"]) == (0.5, 0.5, 0.499, 224, 224)
        assert json.loads(a["normalisation"]) == {"mean": [0.5] * 3, "std": [0.5] * 3}
        c = dict(f["coords"].attrs)  # TRIDENT reads its attributes from the coords dataset
        for k in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap", "name"):
            assert k in c, k
        assert (c["target_magnification"], c["name"]) == (20, "cmu")
    assert not temps(p.parent, "")


def test_features_deterministic_and_worker_independent(tmp_path):
    "Two runs give identical features, and so do workers=0 and workers=2."
    tiles = write_tiles(tmp_path / "cmu.h5", grid(24, step=300))
    enc = load_encoder("efficientnet_lite0")
    runs = [embed_slide(CMU, tiles, tmp_path / f"run{i}.h5", enc, batch_size=8, workers=w)["path"]
            for i, w in enumerate([0, 0, 2])]
    f0, f1, f2 = (h5py.File(p, "r")["features"][:] for p in runs)
    assert np.array_equal(f0, f1) and np.array_equal(f0, f2)
    assert f0.std(0).mean() > 0.01  # different patches give different features


def test_kill_mid_slide_then_resume(tmp_path):
    "SIGKILL mid-slide leaves only a temp file; the re-run skips the finished slide and completes the killed one."
    # the second slide long enough (2,000 patches) that half a second into it is mid-slide on a fast machine too:
    # with 300 it once finished before the kill in CI
    manifest = cohort(tmp_path, {"first": (CMU, grid(8)), "second": (CMU, grid(2000, step=50))})
    out = tmp_path / "features"
    script = textwrap.dedent(f"""
        from wsi_study.embedding import embed_cohort
        embed_cohort({str(manifest)!r}, {str(tmp_path / 'tiles')!r}, {str(out)!r}, {FAST!r}, batch_size=8,
                     device="cpu", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = feature_path(out, FAST, "x").parent
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (folder / "first.h5").exists() and temps(folder, "second.h5"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the embedding finished or died before the kill: {proc.stderr.read()[-2000:]}"
        time.sleep(0.5)  # let it write a few batches of the second slide
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (folder / "first.h5").exists() and not (folder / "second.h5").exists()
    assert len(temps(folder, "second.h5")) == 1
    first_mtime = (folder / "first.h5").stat().st_mtime_ns
    t = embed_cohort(manifest, tmp_path / "tiles", out, FAST, batch_size=8, device="cpu", progress=False)
    assert t.status.tolist() == ["skipped", "ok"] and t.n_patches.tolist() == [8, 2000]
    assert (folder / "first.h5").stat().st_mtime_ns == first_mtime
    assert not temps(folder, "")
    with h5py.File(folder / "second.h5", "r") as f:
        assert f["features"].shape == (2000, 1024) and f.attrs["n_patches"] == 2000


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


KILL_SCRIPTS = {
    # embed_slide on the CPU: the readers write into shared slots made once by the parent
    "slots": "embed_slide({slide!r}, {tiles!r}, {out!r}, {enc!r}, batch_size=32, workers=2, device='cpu')",
    # torch's hand-over by shared-memory name (what embed_slide uses on CUDA), read slowly so batches pile up
    "by_name": "import time\nfor x in patch_loader(PatchDataset({slide!r}, read_tiles({tiles!r})[0], 224, 224), 32, 2):"
               " time.sleep(0.05)",
}


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="shared memory is not a folder here")
@pytest.mark.parametrize("how", sorted(KILL_SCRIPTS))
def test_kill_with_reader_processes_frees_shared_memory(tmp_path, how):
    "SIGKILL mid-slide with 2 reader processes: the readers exit, no shared memory is left behind, no feature file."
    tiles = write_tiles(tmp_path / "cmu.h5", np.tile(grid(117), (40, 1)))  # 4,680 patches: still reading at the kill
    out = tmp_path / "cmu_features.h5"
    script = ("from wsi_study.embedding import embed_slide, patch_loader, PatchDataset, read_tiles\n"
              + KILL_SCRIPTS[how].format(slide=str(CMU), tiles=str(tiles), out=str(out), enc=FAST))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ours = lambda: [p for p in Path("/dev/shm").glob("torch_*") if p.name.split("_")[1] in pids]  # noqa: E731
    pids, readers, deadline = {str(proc.pid)}, [], time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:  # until both readers are reading
            readers = psutil.Process(proc.pid).children()
            pids |= {str(c.pid) for c in readers}
            if len(readers) >= 2 and (how == "slots" or ours()): break
            time.sleep(0.05)
        assert proc.poll() is None and len(readers) >= 2, f"no readers before the kill: {proc.stderr.read()[-2000:]}"
        time.sleep(0.5)  # mid-slide
        assert proc.poll() is None, f"the slide finished before the kill: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 60  # the readers notice their parent is gone; then torch's manager frees what they made
    while (ours() or any(map(alive, readers))) and time.time() < deadline:
        time.sleep(0.25)
    assert not any(map(alive, readers)), "readers outlived the kill"
    assert not ours(), f"shared memory left behind by the killed run: {[p.name for p in ours()][:5]}"
    assert not out.exists()


def damage(path):
    "Overwrite the start of the middle third of every JPEG tile of every page: the file still opens, its pixels do not."
    import tifffile
    with tifffile.TiffFile(path) as t:
        chunks = [(p.dataoffsets, p.databytecounts) for p in t.pages if p.is_tiled]
    with open(path, "r+b") as f:
        for offsets, counts in chunks:
            for i in range(len(offsets) // 3, 2 * len(offsets) // 3):
                f.seek(offsets[i]); f.write(b"\0" * min(int(counts[i]), 64))


def test_damaged_slide_is_one_failure_line(tmp_path):
    """A slide whose tiles cannot be decoded: tiling and embedding (with reader processes) each record one line naming
    the file, the other slide completes, exit code 2, no traceback."""
    (tmp_path / "damaged.svs").write_bytes(CMU.read_bytes())
    (tmp_path / "m.csv").write_text(f"slide_id,patient_id,path\ndamaged,p1,damaged.svs\ngood,p2,{CMU}\n")
    tiles, feats = tmp_path / "tiles", tmp_path / "features"
    res = run_cli("-q", "tile", tmp_path / "m.csv", "--out", tiles, "--mpp", "1", "--scheduler", "none")
    assert res.returncode == 0, res.stderr[-2000:]
    damage(tmp_path / "damaged.svs")
    res = run_cli("-q", "embed", tmp_path / "m.csv", "--tiles", tiles, "--out", feats, "--encoder", FAST,
                  "--workers", "2", "--batch-size", "8", "--device", "cpu", "--scheduler", "none")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    error = pd.read_csv(feats / "failures.csv").set_index("slide_id").error["damaged"]
    assert "damaged.svs: the patch at level-0" in error and "could not be read" in error and "\n" not in error
    assert feature_path(feats, FAST, "good").is_file() and not feature_path(feats, FAST, "damaged").exists()
    res = run_cli("-q", "tile", tmp_path / "m.csv", "--out", tmp_path / "tiles2", "--mpp", "1", "--scheduler", "none")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    error = pd.read_csv(tmp_path / "tiles2" / "failures.csv").set_index("slide_id").error["damaged"]
    assert "damaged.svs: reading it failed while tiling" in error
    assert (tmp_path / "tiles2" / "good.h5").is_file()


def test_bad_slides_go_to_failures_csv(tmp_path):
    "A text file named .svs and a slide without a tiles file are listed in failures.csv; the others complete."
    bad = tmp_path / "corrupt.svs"
    bad.write_text("this is not a slide\n")
    manifest = cohort(tmp_path, {"good": (CMU, grid(6)), "corrupt": (bad, grid(4)), "untiled": (CMU, None),
                                 "good2": (CMU, grid(3, step=500))})
    t = embed_cohort(manifest, tmp_path / "tiles", tmp_path / "features", FAST, batch_size=4, progress=False)
    assert t.status.tolist() == ["ok", "failed", "failed", "ok"]
    f = pd.read_csv(tmp_path / "features" / "failures.csv")
    assert f.columns.tolist() == ["slide_id", "stage", "error"]
    assert f.slide_id.tolist() == ["corrupt", "untiled"] and set(f.stage) == {"embed"}
    assert "corrupt.svs" in f.error[0] and "tiles file not found" in f.error[1]
    assert sorted(p.name for p in feature_path(tmp_path / "features", FAST, "x").parent.iterdir()) == ["good.h5", "good2.h5"]


def test_empty_tiles_give_empty_features(tmp_path):
    "A slide with zero patches gets a 0×D feature file."
    r = embed_slide(CMU, write_tiles(tmp_path / "t.h5", np.zeros((0, 2))), tmp_path / "f" / "e.h5", FAST)
    with h5py.File(r["path"], "r") as f:
        assert f["features"].shape == (0, 1024) and f["coords"].shape == (0, 2) and f.attrs["n_patches"] == 0


def test_reads_at_the_nearest_pyramid_level(tmp_path):
    "On a 3-level pyramid a 1 µm/px patch is read from level 1, not level 0."
    import openslide
    import tifffile
    img = openslide.OpenSlide(str(CMU)).read_region((0, 0), 0, (2220, 2967)).convert("RGB")
    with tifffile.TiffWriter(tmp_path / "pyr.tiff") as tw:
        for k, f in enumerate([1, 2, 4]):
            tw.write(np.asarray(img.resize((2220 // f, 2967 // f))), tile=(256, 256), compression="jpeg",
                     subfiletype=1 if k else 0, resolution=(1e4 / (0.499 * f),) * 2, resolutionunit="CENTIMETER")
    ds = PatchDataset(tmp_path / "pyr.tiff", grid(3, 448, 448), 224, 448)
    assert (ds.level, ds.read_size, tuple(ds[2].shape)) == (1, 224, (3, 224, 224))
    ds4 = PatchDataset(tmp_path / "pyr.tiff", grid(3, 896, 896), 224, 896, out_size=112)
    assert (ds4.level, ds4.read_size, tuple(ds4[0].shape)) == (2, 224, (3, 112, 112))


def test_offline_hub_name_fails_fast_with_one_sentence(monkeypatch):
    "An encoder whose weights must be downloaded fails offline within seconds with one line saying what to do."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ["hf-hub:MahmoodLab/UNI", "hf-hub:wsi-study/no-such-encoder"]:
        t0 = time.perf_counter()
        with pytest.raises(WsiStudyError) as e:
            load_encoder(name)
        msg = str(e.value)
        assert time.perf_counter() - t0 < 5
        assert msg.startswith(f"encoder '{name}': pretrained weights could not be downloaded") and "\n" not in msg
        assert "--weights PATH" in msg


def test_local_checkpoint_nested_and_prefixed(tmp_path):
    "A nested, `module.`-prefixed checkpoint with a classifier loads; another architecture's is refused naming the file."
    import timm
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}, "epoch": 1}, tmp_path / "r18.pt")
    enc = load_encoder("resnet18", weights=tmp_path / "r18.pt")
    assert enc.dim == 512 and enc.weights_sha256 == file_sha256(tmp_path / "r18.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(enc.model(x), full.forward_head(full.forward_features(x), pre_logits=True), atol=1e-5)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "other.pt")
    with pytest.raises(WsiStudyError, match=r"other\.pt: checkpoint does not fit the model: \d+ of \d+ weights"):
        load_encoder("resnet18", weights=tmp_path / "other.pt")


def test_cli_embed_tile_then_embed(tmp_path, tiny_cohort):
    """`wsi-study tile` then `wsi-study embed` on the synthetic cohort; a re-run skips; a hub name offline exits 2."""
    from conftest import run_cli
    tiles, feats = tmp_path / "tiles", tmp_path / "features"
    res = run_cli("-q", "tile", tiny_cohort, "--out", tiles, "--mpp", "1.0", "--patch-size", "128", "--scheduler", "none")
    assert res.returncode == 0, res.stderr
    res = run_cli("-q", "embed", tiny_cohort, "--tiles", tiles, "--out", feats, "--encoder", FAST,
                  "--batch-size", "16", "--scheduler", "none")
    assert res.returncode == 0, res.stderr
    manifest = pd.read_csv(tiny_cohort)
    for sid in manifest.slide_id:
        with h5py.File(feature_path(feats, FAST, sid), "r") as f:
            with h5py.File(tiles / f"{sid}.h5", "r") as t:
                assert (f["coords"][:] == t["coords"][:]).all() and f["features"].shape[0] == len(t["coords"])
    res = run_cli("-q", "embed", tiny_cohort, "--tiles", tiles, "--out", feats, "--encoder", FAST, "--scheduler", "none")
    assert res.returncode == 0 and f"{len(manifest)} already done" in res.stdout
    res = run_cli("-q", "embed", tiny_cohort, "--tiles", tiles, "--out", feats, "--encoder", "hf-hub:nobody/nothing",
                  "--scheduler", "none")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
