"""Run DataComp's own ``baselines.py`` offline: its command line, its code, local model files.

    python bench/datacomp_baselines.py --name basic_filter --metadata_dir POOL/metadata \
        --save_path OUT/basic.npy --num_workers 2

with the environment `bench/datacomp_env.py` prints (``prepare``): ``DATACOMP_BENCH_CHECKOUT``
(a DataComp checkout), ``DATACOMP_BENCH_LID_MODEL`` and ``DATACOMP_BENCH_ENTITY_IDS`` (the
files DataComp would download), ``NLTK_DATA`` (WordNet) and ``PYTHONPATH`` (NLTK 3.8.1).

DataComp fetches its assets from the internet at run time (``baselines.utils.download``:
fastText's ``lid.176.bin`` and the ImageNet-21k WordNet ids, each checked against a SHA-256;
``nltk.download("wordnet")`` for the text filter). This machine has no internet, so before
DataComp's code runs this script points ``download`` at the local files and makes
``nltk.download`` a no-op; nothing else of DataComp's is changed. It runs ``baselines.py``'s
own source as the main program, so DataComp's argument checks, worker pool, sort and save are
its own, and the patch sits at this file's top level, where the spawned workers DataComp
starts (``mp.set_start_method("spawn")``) run it too when they import the main module.

Only standard-library code here: it runs under any interpreter that can run DataComp (ours
plus NLTK 3.8.1, or DataComp's own environment).
"""

from __future__ import annotations

import os
import sys

CHECKOUT = os.environ.get("DATACOMP_BENCH_CHECKOUT", "")
LOCAL_ASSETS = {  # DataComp's asset name -> the environment variable naming our local copy
    "fasttext": "DATACOMP_BENCH_LID_MODEL",
    "imagenet21k_wordnet_ids": "DATACOMP_BENCH_ENTITY_IDS",
}

if not os.path.isfile(os.path.join(CHECKOUT, "baselines.py")):
    sys.exit(f"DATACOMP_BENCH_CHECKOUT={CHECKOUT!r} holds no baselines.py: run bench/datacomp_env.py DIR first")
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)

import nltk  # noqa: E402

import baselines.utils  # noqa: E402  (DataComp's module; imported before baselines.apply_filter binds `download`)


def local_download(name: str, root: str | None = None) -> str:
    """`baselines.utils.download` without the internet: the local copy of asset `name`."""
    variable = LOCAL_ASSETS.get(name)
    path = os.environ.get(variable, "") if variable else ""
    if not os.path.isfile(path):
        raise RuntimeError(f"DataComp asks for {name!r}, which has no local copy here (set {variable or 'nothing'}); "
                           "the image-based baselines need DataComp's centroid and target downloads")
    return path


baselines.utils.download = local_download
nltk.download = lambda *args, **kwargs: True  # WordNet comes from NLTK_DATA

if __name__ == "__main__":
    script = os.path.join(CHECKOUT, "baselines.py")
    sys.argv = [script, *sys.argv[1:]]
    with open(script, encoding="utf-8") as f:
        code = compile(f.read(), script, "exec")
    exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})
