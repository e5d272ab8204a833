"""embed_slide's CUDA path (pinned batches, channels-last, autocast) and MIL training on the GPU, for a machine with a GPU: `make gpu-check`.

Skipped where torch sees no CUDA GPU, as on the 2-core machines this project's CI runs on; the CPU path is covered by
test_embedding.py. A GPU changes the arithmetic (autocast runs the convolutions in bf16 or fp16) but not the patches,
so the features must match the CPU's closely, patch by patch, whichever way the batches reach the GPU."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from test_embedding import CMU, grid, write_tiles
from wsi_study.bench import run_bench
from wsi_study.embedding import embed_slide
from wsi_study.encoders import load_encoder
from wsi_study.evaluation.compare import HEADLINE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")


def features(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][:]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_features_match_cpu(tmp_path, workers):
    "Autocast on the GPU, from a reading thread or from 2 reader processes with pinned batches: the CPU's features."
    tiles = write_tiles(tmp_path / "cmu.h5", grid(40, step=250))
    cpu = embed_slide(CMU, tiles, tmp_path / "cpu.h5", load_encoder("efficientnet_lite0"), batch_size=16, device="cpu")
    gpu = embed_slide(CMU, tiles, tmp_path / "gpu.h5", load_encoder("efficientnet_lite0", device="cuda"),
                      batch_size=16, workers=workers, device="cuda")
    assert gpu["n_patches"] == cpu["n_patches"] == 40
    a, b = features(cpu["path"]), features(gpu["path"])
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert cosine(a, b).min() > 0.99, cosine(a, b).min()  # bf16/fp16 convolutions, the same patches in the same order
    with h5py.File(gpu["path"], "r") as f:
        assert (f["coords"][:] == grid(40, step=250)).all() and f.attrs["n_patches"] == 40


def test_bench_embed_on_cuda(tmp_path):
    "The GPU benchmark runs and reports its two targets (a benchmark, not a timed test: the values are not asserted)."
    res = run_bench("embed", tmp_path, slide=CMU, model="random:resnet18", n_patches=64, rounds=1, device="cuda",
                    progress=False)
    v = {r["key"]: r for r in res["measurements"]}
    assert v["forward_per_s"]["value"] > 0 and v["embed_slide_per_s"]["value"] > 0
    assert v["embed_vs_forward"]["target"] == "≥ 0.8"  # with autocast, against a pure forward pass on the same GPU
    assert v["embed_vs_tiatoolbox"]["target"] == "≥ 2"  # against TIAToolbox's engine, same model and batches
    assert Path(tmp_path / "bench_embed.md").is_file()


def _mil_run(bags, model, task, device, out, **hp):
    from wsi_study.evaluation.cv import train_cv
    return train_cv(bags, None, model, task, out, folds=3, seed=0, epochs=30, device=device, progress=False,
                    n_boot=50, heatmaps=0, **hp)


@pytest.mark.parametrize("model,task,hp", [("deepattnmisl", "survival", {"k": 4}),
                                           ("deepattnmisl", "survival", {"k": 4, "strata_weight": 1.0, "strata_detach": True}),
                                           ("deepattnmisl", "stage", {"k": 4}), ("abmil", "survival", {}),
                                           ("clam_sb", "stage", {}), ("maxpool", "survival", {})])
def test_mil_training_on_cuda(tmp_path, model, task, hp):
    "train_cv on the GPU: every neural model learns the planted signal there about as well as on the CPU (float32 both)."
    from wsi_study.models.bags import synthetic_bags
    bags = synthetic_bags(36, dim=16, seed=0)
    gpu = _mil_run(bags, model, task, "cuda", tmp_path / "gpu", **hp)
    cpu = _mil_run(bags, model, task, "cpu", tmp_path / "cpu", **hp)
    key = HEADLINE[task]
    assert json.loads((tmp_path / "gpu" / "params.json").read_text())["device"].startswith("cuda")
    assert gpu[key] > 0.65 and abs(gpu[key] - cpu[key]) < 0.1, (gpu[key], cpu[key])


@pytest.mark.parametrize("model,task", [("deepattnmisl", "survival"), ("abmil", "stage")])
def test_saved_model_predicts_on_cuda(tmp_path, model, task):
    "A model.pt trained on the GPU by an external validation predicts its test cohort the same on the GPU and the CPU."
    import pandas as pd
    from wsi_study.evaluation.cv import train_cv
    from wsi_study.evaluation.predict import predict_cohort
    from wsi_study.models.bags import synthetic_bags
    dev, ext = synthetic_bags(32, dim=16, seed=0), synthetic_bags(12, dim=16, seed=5)
    train_cv(dev, None, model, task, tmp_path / "x", device="cuda", members=2, epochs=5, min_epochs=2, progress=False,
             n_boot=20, heatmaps=0, test_manifest=ext, **({"k": 4} if model == "deepattnmisl" else {}))
    for d in ("cuda", "cpu"):
        predict_cohort(tmp_path / "x" / "model.pt", ext, None, tmp_path / d, device=d, n_boot=20, heatmaps=0, progress=False)
    a, b = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("cuda", "cpu"))
    cols = ["risk"] if task == "survival" else ["prob_A", "prob_B", "prob_C", "prob_D"]
    assert np.allclose(a[cols], b[cols], atol=1e-4), (a[cols] - b[cols]).abs().max()


def test_bench_mil_on_cuda(tmp_path):
    "The MIL benchmark runs on the GPU (its seconds are reported, not asserted)."
    res = run_bench("mil", tmp_path, device="cuda", patients=64, patches=200, dim=64, progress=False)
    assert res["device"].startswith("cuda")
    assert {r["key"] for r in res["measurements"]} >= {"deepattnmisl_epoch_s", "abmil_epoch_s"}
