"""Benchmarks run tiny: each writes bench_<name>.json and .md with the expected keys and positive throughputs.

Speed targets are not asserted here (the machines are shared and noisy); `run_bench` with the default sizes measures them.
"""
import json
import os

import pytest

from conftest import ROOT
from wsi_study.bench import run_bench, usable_cpus
from wsi_study.bench_tiling import synthetic_slide
from wsi_study.cli import main
from wsi_study.core import WsiStudyError

CMU = ROOT / "data" / "wsi" / "cmu_small_region.svs"
KEYS = {"bench", "device", "machine", "params", "measurements", "values", "notes", "runs", "passed", "failed",
        "seconds", "load_average_after"}


def read_outputs(out, name):
    "The JSON and markdown a benchmark wrote, checked for the common keys and the table header."
    data = json.loads((out / f"bench_{name}.json").read_text())
    md = (out / f"bench_{name}.md").read_text()
    assert KEYS <= set(data), KEYS - set(data)
    assert {"cpu_count", "cpus_usable", "torch_threads", "device_name", "load_average"} <= set(data["machine"])
    assert "| measurement | value | target | pass |" in md and f"# Benchmark `{name}`" in md
    for row in data["measurements"]:
        assert {"key", "measurement", "value", "unit", "target", "passed"} <= set(row)
        assert row["measurement"] in md
    return data, md


def test_bench_io(tmp_path):
    """io: raw OpenSlide, TIAToolbox read_rect and our loader (in process, 1 and 2 workers) all read patches."""
    workers = (1, 2) if len(usable_cpus()) >= 2 else (1,)
    res = run_bench("io", tmp_path, slide=CMU, n_reads=32, batch_size=8, workers=workers, rounds=1, progress=False)
    data, md = read_outputs(tmp_path, "io")
    v = data["values"]
    for k in ["raw_openslide_per_s", "tiatoolbox_per_s", "loader_w0_per_s"] + [f"loader_w{w}_per_s" for w in workers]:
        assert v[k] > 0, k
    targets = {r["key"]: r["target"] for r in data["measurements"]}
    assert targets["loader_vs_openslide"] == "≥ 0.8" and targets["loader_vs_tiatoolbox"] == "≥ 1.3"
    assert "scaling_w2" in v or len(workers) == 1
    assert v.get("shares_vs_alternate_w2", 1) > 0 and ("shares_vs_alternate_w2" in v or len(workers) == 1)  # reader shares, side by side
    assert all(v[f"loader_w{w}_fd_per_s"] > 0 for w in workers)  # the hand-over by descriptor, side by side
    assert all(r["items"] == 32 for runs in data["runs"].values() for r in runs)
    assert res["values"] == v


def test_bench_embed(tmp_path, capsys):
    """embed, from the command line: pure forward, embed_slide and TIAToolbox's DeepFeatureExtractor embed the same 16
    patches of the slide, encoder, batch size and thread count asked for."""
    assert main(["-q", "bench", "embed", "--slide", str(CMU), "--encoder", "random:mobilenetv3_small_050",
                 "--patches", "16", "--batch-size", "8", "--threads", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    data, md = read_outputs(tmp_path, "embed")
    assert md in capsys.readouterr().out  # the table is printed too
    v = data["values"]
    assert v["forward_per_s"] > 0 and v["embed_slide_per_s"] > 0 and v["embed_vs_forward"] > 0
    assert data["tiatoolbox_error"] is None, data["tiatoolbox_error"]
    assert v["tiatoolbox_per_s"] > 0 and v["n_patches"] == v["tiatoolbox_n_patches"] == 16
    assert v["rss_growth_mib"] is not None and data["machine"]["device"] == "cpu"
    p = data["params"]
    assert (p["slide"], p["model"], p["batch_size"], p["threads"], p["workers"]) == (str(CMU), "random:mobilenetv3_small_050", 8, 1, 0)
    assert p["weights_sha256"] == "random" and p["level0_mpp"] == pytest.approx(0.499, abs=1e-3)
    assert not list(tmp_path.glob(".bench-embed-*"))  # scratch files are removed


def test_bench_slide_errors(tmp_path, shared, capsys):
    """A benchmark slide OpenSlide cannot open, or one without an mpp for bench embed, is one line and exit code 2,
    before anything runs or is written."""
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    out = tmp_path / "out"
    assert main(["bench", "io", "--slide", str(notes), "--out", str(out)]) == 2
    assert main(["bench", "embed", "--slide", str(shared / "tcga-cr-7395-01a-01-ts1.svs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"error: {notes}: OpenSlide cannot open it (") and "pass a slide it opens" in err[0]
    assert err[1].endswith("tcga-cr-7395-01a-01-ts1.svs: no mpp in the slide's metadata; pass --mpp (mpp= from Python), "
                           "its level-0 µm/px")
    assert not list(out.glob("bench_*"))


def test_bench_tiling(tmp_path):
    """tiling: ours and the TIAToolbox baseline tile a cached 4096-px synthetic slide to similar patch counts."""
    run_bench("tiling", tmp_path, size=4096, rounds=1, progress=False)
    data, _ = read_outputs(tmp_path, "tiling")
    v = data["values"]
    assert v["tile_slide_seconds"] > 0 and v["tiatoolbox_seconds"] > 0
    assert v["n_patches"] > 0 and v["tiatoolbox_n_patches"] > 0 and v["patch_count_ratio"] > 0
    slide = tmp_path / "cache" / "synthetic_4096px_C_seed0.tiff"
    mtime = os.stat(slide).st_mtime_ns
    assert synthetic_slide(tmp_path / "cache", 4096, progress=False) == slide and os.stat(slide).st_mtime_ns == mtime


def test_unknown_bench(tmp_path):
    """An unknown benchmark name is a one-line WsiStudyError naming the choices."""
    with pytest.raises(WsiStudyError, match="unknown benchmark 'nope'; choose one of io, embed, tiling, mil"):
        run_bench("nope", tmp_path)


def test_bench_mil(tmp_path):
    """mil: a DeepAttnMISL epoch (k-means included) and an ABMIL epoch, tabled like the others with the 20 s target."""
    run_bench("mil", tmp_path, patients=12, patches=30, dim=16, k=4, batch_size=4, abmil_batches=2, device="cpu",
              progress=False)
    data, md = read_outputs(tmp_path, "mil")
    v = data["values"]
    assert v["deepattnmisl_epoch_s"] > 0 and v["abmil_epoch_s"] > 0 and v["abmil_vs_deepattnmisl"] > 0
    assert {r["key"]: r["target"] for r in data["measurements"]}["deepattnmisl_epoch_s"] == "≤ 20"
    assert data["machine"]["device"] == "cpu" and "12 patients × 30 patches × 16-d" in md
