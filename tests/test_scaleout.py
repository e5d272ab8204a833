"""Scale-out on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on loopback, one killed mid-run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import CLI
from wsi_study.tiling import read_tiles

BIN = Path(sys.executable).parent


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two single-threaded workers without nannies (a killed worker stays dead)."""
    sched = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for _ in range(200):
        if sched.is_file() and sched.stat().st_size: break
        time.sleep(0.1)
    for name in ("w1", "w2"):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched), "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard", "--name", name, "--host", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    yield sched
    for p in procs:
        p.kill()
        p.wait()


def test_killed_worker_slides_retried(cluster, tiny_cohort, tmp_path):
    """SIGKILL the worker running a slide: its slides are retried on the other worker and the batch completes."""
    from distributed import Client
    client = Client(scheduler_file=str(cluster), timeout=30)
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    out = tmp_path / "tiles"
    job = subprocess.Popen([CLI, "-q", "tile", str(tiny_cohort), "--out", str(out), "--patch-size", "128",
                            "--scheduler", str(cluster)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            victim = busy[0]
            os.kill(pids[victim], signal.SIGKILL)
        time.sleep(0.05)
    assert victim is not None, "no task ever ran"
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    survivors = set(client.scheduler_info()["workers"])
    assert victim not in survivors and len(survivors) == 1
    client.close()
    table = pd.read_csv(out / "tiles.csv")
    manifest = pd.read_csv(tiny_cohort)
    assert sorted(table.slide_id) == sorted(manifest.slide_id) and (table.status == "ok").all()
    for sid in manifest.slide_id:
        coords, attrs = read_tiles(out / f"{sid}.h5")
        assert attrs["patch_size"] == 128 and len(coords) > 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # the surviving worker also embeds the cohort as per-slide jobs, each with its own reader processes
    feats = tmp_path / "features"
    res = subprocess.run([CLI, "-q", "embed", str(tiny_cohort), "--tiles", str(out), "--out", str(feats), "--encoder",
                          "random:mobilenetv3_small_050", "--batch-size", "16", "--workers", "2",
                          "--scheduler", str(cluster)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    from wsi_study.embedding import feature_path
    assert all(feature_path(feats, "random:mobilenetv3_small_050", sid).is_file() for sid in manifest.slide_id)


def test_local_cluster_jobs_start_reader_processes(tiny_cohort, tmp_path):
    """`embed --workers 2` on the default local cluster (reader processes inside each Dask worker, whose processes are
    not daemonic: nbs/07_scaleout.ipynb) completes every slide with the same features as reading in process."""
    import h5py
    import numpy as np
    from wsi_study.embedding import feature_path
    tiles, enc = tmp_path / "tiles", "random:mobilenetv3_small_050"
    assert subprocess.run([CLI, "-q", "tile", str(tiny_cohort), "--out", str(tiles), "--patch-size", "128",
                           "--scheduler", "none"], capture_output=True, timeout=300).returncode == 0
    runs = {"local": ["--scheduler", "local", "--dask-workers", "1", "--workers", "2"], "none": ["--scheduler", "none"]}
    for name, extra in runs.items():
        res = subprocess.run([CLI, "-q", "embed", str(tiny_cohort), "--tiles", str(tiles), "--out", str(tmp_path / name),
                              "--encoder", enc, "--batch-size", "16", *extra], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and "daemonic" not in res.stderr, res.stderr[-3000:]
    for sid in pd.read_csv(tiny_cohort).slide_id:
        a, b = (h5py.File(feature_path(tmp_path / n, enc, sid), "r")["features"][:] for n in runs)
        assert len(a) > 0 and np.allclose(a, b, atol=1e-5), sid
