"""DataComp's evaluation task list as data: names, main metrics, layouts and score groups.

One entry per task of DataComp's `tasklist.yml` (40 entries, in its order), with its
`aggregate_scores.py` group. `trainer.evaluate --datacomp-dir` evaluates them and
`trainer.compare` reads the same table; nothing else lists task names.

- `key` / `name`: the `key` and `dataset` of a line of `eval_results.jsonl` (DataComp writes
  the tasklist key and its `name`).
- `main_metric`: `tasklist.yml`'s (`acc1` when it names none); None for FairFace and UTKFace,
  which DataComp evaluates but does not score, so 38 tasks count.
- `kind`: how the task is evaluated, `classification` (zero-shot, DataComp's `wds_eval`),
  `retrieval`, `winogavil`, or `grouped` (classification plus a metric over groups of samples
  given by each sample's `.npy` metadata, as DataComp's `wilds_eval` / `fairness_eval`).
- `metadata_fields` / `group_by`: the columns of a grouped task's `.npy` metadata and the ones
  its group metrics split by (DataComp's evaluators' `_metadata_fields` and groupers).
- `folder`: where `download_evalsets.py` puts it under `--data_dir`: `wds_<key, '/' -> '-'>_test`
  (`fairness/` dropped). DataComp reads the retrieval sets and WinoGAViL from the Hugging Face
  hub instead; locally we read retrieval sets in clip_benchmark's webdataset layout
  (`dataset_type.txt` says `retrieval`), under DataComp's folder name or clip_benchmark's, and
  WinoGAViL in a layout of ours (`trainer.evaluate.WINOGAVIL_LAYOUT`) under DataComp's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

KINDS = ("classification", "retrieval", "winogavil", "grouped")

# aggregate_scores.py's groups, in its print order; "ImageNet" is ImageNet 1k alone.
IMAGENET_GROUP = "ImageNet"
DIST_SHIFTS_GROUP = "ImageNet dist. shifts"
VTAB_GROUP = "VTAB"
RETRIEVAL_GROUP = "Retrieval"
GROUPS = (IMAGENET_GROUP, DIST_SHIFTS_GROUP, VTAB_GROUP, RETRIEVAL_GROUP)
AVERAGE = "Average"
NUM_SCORED = 38


@dataclass(frozen=True, kw_only=True)
class DataCompTask:
    key: str
    name: str
    main_metric: str | None = "acc1"
    kind: str = "classification"
    group: str | None = None  # its aggregate_scores.py group
    num_classes: int | None = None
    size: int  # test samples in DataComp's copy
    metadata_fields: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    folder_aliases: tuple[str, ...] = ()  # other folder names accepted (clip_benchmark's)
    hub_dataset: str | None = None  # the Hugging Face dataset DataComp reads instead of a folder

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.key}: kind {self.kind!r} not one of {KINDS}")
        if self.group is not None and self.group not in GROUPS:
            raise ValueError(f"task {self.key}: group {self.group!r} not one of {GROUPS}")
        if not set(self.group_by) <= set(self.metadata_fields):
            raise ValueError(f"task {self.key}: group_by {self.group_by} not in {self.metadata_fields}")

    @property
    def scored(self) -> bool:
        return self.main_metric is not None

    @property
    def folder(self) -> str:
        """download_evalsets.py's folder name for the task."""
        task = self.key.split("/", 1)[1] if self.key.startswith("fairness/") else self.key
        return f"wds_{task.replace('/', '-')}_test"

    @property
    def folders(self) -> tuple[str, ...]:
        return (self.folder, *self.folder_aliases)


def _classification(key, name, size, num_classes, group=None, main_metric="acc1"):
    return DataCompTask(key=key, name=name, size=size, num_classes=num_classes, group=group,
                        main_metric=main_metric)


_R = "mean_per_class_recall"
TASKS: tuple[DataCompTask, ...] = (
    _classification("vtab/caltech101", "Caltech-101", 6085, 102, VTAB_GROUP, _R),
    _classification("cifar10", "CIFAR-10", 10000, 10),
    _classification("vtab/cifar100", "CIFAR-100", 10000, 100, VTAB_GROUP),
    _classification("vtab/clevr_count_all", "CLEVR Counts", 15000, 8, VTAB_GROUP),
    _classification("vtab/clevr_closest_object_distance", "CLEVR Distance", 15000, 6, VTAB_GROUP),
    _classification("country211", "Country211", 21100, 211),
    _classification("vtab/dtd", "Describable Textures", 1880, 47, VTAB_GROUP),
    _classification("vtab/eurosat", "EuroSAT", 5400, 10, VTAB_GROUP),
    _classification("fgvc_aircraft", "FGVC Aircraft", 3333, 100, main_metric=_R),
    _classification("food101", "Food-101", 25250, 101),
    _classification("gtsrb", "GTSRB", 12630, 43),
    _classification("imagenet1k", "ImageNet 1k", 50000, 1000, IMAGENET_GROUP),
    _classification("imagenet_sketch", "ImageNet Sketch", 50889, 1000, DIST_SHIFTS_GROUP),
    _classification("imagenetv2", "ImageNet v2", 10000, 1000, DIST_SHIFTS_GROUP),
    _classification("imagenet-a", "ImageNet-A", 7500, 200, DIST_SHIFTS_GROUP),
    _classification("imagenet-o", "ImageNet-O", 2000, 200, DIST_SHIFTS_GROUP),
    _classification("imagenet-r", "ImageNet-R", 30000, 200, DIST_SHIFTS_GROUP),
    _classification("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", 711, 4, VTAB_GROUP),
    _classification("mnist", "MNIST", 10000, 10),
    _classification("objectnet", "ObjectNet", 18574, 113, DIST_SHIFTS_GROUP),
    _classification("vtab/flowers", "Oxford Flowers-102", 6149, 102, VTAB_GROUP, _R),
    _classification("vtab/pets", "Oxford-IIIT Pet", 3669, 37, VTAB_GROUP, _R),
    _classification("voc2007", "Pascal VOC 2007", 14976, 20),
    _classification("vtab/pcam", "PatchCamelyon", 32768, 2, VTAB_GROUP),
    _classification("renderedsst2", "Rendered SST2", 1821, 2),
    _classification("vtab/resisc45", "RESISC45", 6300, 45, VTAB_GROUP),
    _classification("cars", "Stanford Cars", 8041, 196),
    _classification("stl10", "STL-10", 8000, 10),
    _classification("sun397", "SUN397", 108754, 397, VTAB_GROUP),
    _classification("vtab/svhn", "SVHN", 26032, 10, VTAB_GROUP),
    DataCompTask(key="retrieval/flickr_1k_test_image_text_retrieval", name="Flickr", size=1000,
                 main_metric="mean_recall@1", kind="retrieval", group=RETRIEVAL_GROUP,
                 folder_aliases=("wds_flickr1k_test", "wds_flickr1k"),
                 hub_dataset="nlphuji/flickr_1k_test_image_text_retrieval"),
    DataCompTask(key="retrieval/mscoco_2014_5k_test_image_text_retrieval", name="MSCOCO", size=5000,
                 main_metric="mean_recall@1", kind="retrieval", group=RETRIEVAL_GROUP,
                 folder_aliases=("wds_mscoco_captions_test", "wds_mscoco_captions"),
                 hub_dataset="nlphuji/mscoco_2014_5k_test_image_text_retrieval"),
    DataCompTask(key="misc/winogavil", name="WinoGAViL", size=3563, main_metric="jaccard_score_10-12",
                 kind="winogavil", group=RETRIEVAL_GROUP, hub_dataset="nlphuji/winogavil"),
    DataCompTask(key="wilds/iwildcam", name="iWildCam", size=42791, num_classes=182,
                 main_metric="F1-macro_all", kind="grouped",
                 metadata_fields=("location", "sequence", "year", "month", "day", "hour", "minute",
                                  "second", "y")),
    DataCompTask(key="wilds/camelyon17", name="Camelyon17", size=85054, num_classes=2, kind="grouped",
                 metadata_fields=("hospital", "slide", "y"), group_by=("slide",)),
    DataCompTask(key="wilds/fmow", name="FMoW", size=22108, num_classes=62,
                 main_metric="acc_worst_region", kind="grouped",
                 metadata_fields=("region", "year", "y"), group_by=("year", "region")),
    DataCompTask(key="fairness/dollar_street", name="Dollar Street", size=3503, num_classes=58,
                 main_metric="acc_top5_wg", kind="grouped",
                 metadata_fields=("income_ds", "income_meta", "region"), group_by=("income_ds",)),
    DataCompTask(key="fairness/geode", name="GeoDE", size=12488, num_classes=40, main_metric="acc_wg",
                 kind="grouped", metadata_fields=("region", "country"), group_by=("region",)),
    DataCompTask(key="fairness/fairface", name="FairFace", size=10954, main_metric=None, kind="grouped"),
    DataCompTask(key="fairness/utkface", name="UTKFace", size=23703, main_metric=None, kind="grouped"),
)
TASKS_BY_KEY: dict[str, DataCompTask] = {t.key: t for t in TASKS}
TASKS_BY_NAME: dict[str, DataCompTask] = {t.name: t for t in TASKS}
SCORED_TASKS: tuple[DataCompTask, ...] = tuple(t for t in TASKS if t.scored)
# key -> main metric of the 38 scored tasks (what trainer.compare averages)
MAIN_METRICS: dict[str, str] = {t.key: t.main_metric for t in SCORED_TASKS}
assert len(TASKS) == 40 and len(SCORED_TASKS) == NUM_SCORED
GROUP_TASKS: dict[str, tuple[str, ...]] = {g: tuple(t.key for t in SCORED_TASKS if t.group == g)
                                            for g in GROUPS}


@dataclass(frozen=True)
class GroupScore:
    """One aggregate of aggregate_scores.py over the tasks present."""

    group: str
    value: float | None  # mean main metric over the group's tasks present (None: none present)
    present: int
    total: int

    @property
    def complete(self) -> bool:
        return self.present == self.total


def aggregate_scores(main_metrics: Mapping[str, float | None]) -> dict[str, GroupScore]:
    """aggregate_scores.py's numbers from {task key: main metric}: ImageNet, the dist. shifts,
    VTAB and Retrieval means and the Average over the scored tasks. Where a task is missing
    the mean is over those present (`present` < `total`); with all 38 they equal DataComp's.
    Keys that are not scored DataComp tasks, and None values, are left out (as its dropna)."""
    present = {k: float(v) for k, v in main_metrics.items() if k in MAIN_METRICS and v is not None}
    out = {}
    for group in (*GROUPS, AVERAGE):
        keys = GROUP_TASKS[group] if group != AVERAGE else tuple(MAIN_METRICS)
        values = [present[k] for k in keys if k in present]
        out[group] = GroupScore(group, sum(values) / len(values) if values else None, len(values), len(keys))
    return out


def main_metric_values(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{task key: main metric} for the scored DataComp tasks among `results` (key -> metrics);
    `main_metric` where the line has it, else the task's named main metric."""
    out = {}
    for key, metrics in results.items():
        if key in MAIN_METRICS:
            v = metrics.get("main_metric", metrics.get(MAIN_METRICS[key]))
            if v is not None:
                out[key] = float(v)
    return out


def find_task_folder(root, task: DataCompTask):
    """The task's folder under a DataComp `--data_dir`, or None."""
    from pathlib import Path

    for name in task.folders:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    return None

