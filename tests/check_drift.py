"""nbdev drift check: the committed library must be exactly what the notebooks export.

Copies the working tree's files (tracked and untracked-but-not-ignored) to a scratch repo, runs `nbdev_clean` and
`nbdev_export` there, and fails if either changed anything, or if a module in wsi_study/ has no source notebook
(nbdev never deletes modules whose notebook is gone). Exit 0 when in sync, 1 otherwise.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def orphan_modules(root: Path) -> list[str]:
    exported = set()
    for nb in (root / "nbs").rglob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"])
            for line in src.splitlines():
                if line.strip().startswith("#| default_exp"):
                    exported.add(line.split("default_exp", 1)[1].strip().replace(".", "/") + ".py")
    mods = [str(p.relative_to(root / "wsi_study")) for p in (root / "wsi_study").rglob("*.py")]
    return sorted(m for m in mods if m not in exported and Path(m).name not in ("__init__.py", "_modidx.py"))


def cells_without_id(root: Path) -> list[str]:
    "Notebooks whose cells lack an `id`: nbformat then invents random ids and every export differs."
    return sorted(str(nb.relative_to(root)) for nb in (root / "nbs").rglob("*.ipynb")
                  if any(not c.get("id") for c in json.loads(nb.read_text())["cells"]))


def main() -> int:
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in filter(None, files):
            if (ROOT / f).is_file():
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, tmp / f)
        git("init", "-q", cwd=tmp)
        git("add", "-A", cwd=tmp)
        git("-c", "user.email=ci@localhost", "-c", "user.name=ci", "commit", "-qm", "snapshot", cwd=tmp)
        for tool in ("nbdev_clean", "nbdev_export"):
            subprocess.run([str(BIN / tool)], cwd=tmp, check=True, capture_output=True)
        changed = git("status", "--porcelain", "--untracked-files=all", cwd=tmp).strip()
        orphans = orphan_modules(tmp)
    ok = True
    no_ids = cells_without_id(ROOT)
    if no_ids:
        ok = False
        print("notebook cells without an id (open and save them in Jupyter, or add ids):", ", ".join(no_ids))
    if changed:
        ok = False
        print("nbdev drift: `nbdev_clean && nbdev_export` change these files; run `make export` and commit:")
        print(changed)
    if orphans:
        ok = False
        print("modules without a source notebook (delete them or restore their notebook):", ", ".join(orphans))
    if ok:
        print("nbdev drift check: library and notebooks are in sync")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
