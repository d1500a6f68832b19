"""Download a CommonPool: metadata from the Hugging Face hub, images with img2dataset.

    python -m pools.download --scale small --data-root data/small [--npz] [--skip-images]

Metadata (reference section 7, done file by file instead of one snapshot):
  lists ``mlfoundations/datacomp_<scale>`` (a dataset repo) with ``HfApi.list_repo_tree``, then
  fetches each ``.parquet`` (and ``.npz`` with ``--npz``) with ``hf_hub_download`` into
  ``<data-root>/metadata/`` (``part_*/`` subfolders, as xlarge has, are flattened). Each file is
  checked against the hub's size and LFS sha256; a file already there and verified is skipped,
  so a rerun resumes where it stopped (a half-downloaded file resumes inside huggingface_hub).
  The hub is ``HF_ENDPOINT`` or ``--hf-endpoint``; an unreachable hub is a clear error.

Images: ``img2dataset.download`` with DataComp's settings: webdataset output, 512 px
  keep-ratio-largest only if bigger, jpg, 10,000 samples per shard, ``uid`` saved, face boxes
  blurred (``face_bboxes``), 2 retries, into ``<data-root>/shards/``; img2dataset's incremental
  mode skips finished shards, so a rerun fetches only unfinished ones. Afterwards
  ``<data-root>/download_summary.json`` gives successes and failures (with reasons) per shard
  and in total, and ``total == successes + failed_to_download + failed_to_resize``.

``--metadata-dir`` downloads the images of your own parquets (``url``, ``text`` columns; BYOD).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from pools.files import sha256_file, write_json_atomic
from pools.format import SAMPLES_PER_SHARD, Pool

HUB_SCALES = ("small", "medium", "large", "xlarge")
VERIFIED_FILE = ".verified.json"  # in metadata/: files already checked against the hub


class HubError(RuntimeError):
    """The hub could not be reached or answered something unexpected; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class RemoteFile:
    path: str  # path inside the repo
    size: int
    sha256: str | None  # the LFS oid; None for a small non-LFS file

    @property
    def local_name(self) -> str:
        return PurePosixPath(self.path).name  # xlarge's part_*/ subfolders are flattened


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """img2dataset's arguments in DataComp's download_upstream.py (reference section 7)."""

    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    number_sample_per_shard: int = SAMPLES_PER_SHARD
    processes_count: int = 16
    thread_count: int = 128
    retries: int = 2
    timeout: int = 10
    oom_shard_count: int = 8
    blur_faces: bool = True


def repo_id_for(scale: str) -> str:
    if scale not in HUB_SCALES:
        raise ValueError(f"the hub has CommonPool metadata for {', '.join(HUB_SCALES)}, not {scale!r}; "
                         "pass --repo-id for another dataset repo")
    return f"mlfoundations/datacomp_{scale}"


# --- metadata ---------------------------------------------------------------------------------
def _hub_error(exc: Exception, endpoint: str, repo_id: str) -> HubError:
    return HubError(f"could not reach the Hugging Face hub at {endpoint} for dataset {repo_id} "
                    f"({type(exc).__name__}: {exc}). Check the network or set HF_ENDPOINT / "
                    "--hf-endpoint to a mirror; files already downloaded are kept, rerun to resume")


def list_remote_files(repo_id: str, endpoint: str, suffixes: tuple[str, ...],
                      revision: str | None = None) -> list[RemoteFile]:
    """The repo's files ending in `suffixes`, with sizes and sha256, sorted by path."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    try:
        entries = list(api.list_repo_tree(repo_id, repo_type="dataset", recursive=True, revision=revision))
    except Exception as exc:  # httpx / hub errors of many kinds
        raise _hub_error(exc, endpoint, repo_id) from exc
    files = []
    for e in entries:
        if not hasattr(e, "size") or not e.path.endswith(suffixes):
            continue
        lfs = getattr(e, "lfs", None)
        sha = (lfs.get("sha256") or lfs.get("oid")) if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        files.append(RemoteFile(path=e.path, size=int(e.size), sha256=sha))
    files.sort(key=lambda f: f.path)
    names = [f.local_name for f in files]
    if len(set(names)) != len(names):
        raise HubError(f"{repo_id}: two files share a name after flattening subfolders")
    return files


def _load_verified(metadata_dir: Path) -> dict:
    path = metadata_dir / VERIFIED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_verified(local: Path, remote: RemoteFile, verified: dict) -> bool:
    """Whether `local` is `remote`: size always, sha256 once (then remembered by size+mtime)."""
    if not local.is_file() or local.stat().st_size != remote.size:
        return False
    st = local.stat()
    seen = verified.get(local.name)
    if seen and seen == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": remote.sha256}:
        return True
    return remote.sha256 is None or sha256_file(local) == remote.sha256


def download_metadata(repo_id: str, metadata_dir: Path, *, endpoint: str, npz: bool = False,
                      revision: str | None = None) -> dict:
    """Fetch the repo's parquet (and npz) files one by one, verified; returns counts."""
    from huggingface_hub import hf_hub_download
    from tqdm import tqdm

    suffixes = (".parquet", ".npz") if npz else (".parquet",)
    remote = list_remote_files(repo_id, endpoint, suffixes, revision)
    if not remote:
        raise HubError(f"{endpoint}: dataset {repo_id} has no {' or '.join(suffixes)} files")
    metadata_dir.mkdir(parents=True, exist_ok=True)
    verified = _load_verified(metadata_dir)
    counts = {"files": len(remote), "downloaded": 0, "already_present": 0, "bytes_downloaded": 0}
    staging = metadata_dir / ".hub"
    for f in tqdm(remote, desc="metadata", unit="file", file=sys.stderr):
        local = metadata_dir / f.local_name
        if is_verified(local, f, verified):
            counts["already_present"] += 1
        else:
            try:
                got = Path(hf_hub_download(repo_id, f.path, repo_type="dataset", revision=revision,
                                           local_dir=staging, endpoint=endpoint))
            except Exception as exc:
                raise _hub_error(exc, endpoint, repo_id) from exc
            size = got.stat().st_size
            sha = sha256_file(got) if f.sha256 else None
            if size != f.size or sha != f.sha256:
                got.unlink()
                raise HubError(f"{f.path} from {endpoint} has {size} bytes and sha256 {sha}; the hub "
                               f"lists {f.size} bytes and {f.sha256}. The partial file was removed; rerun")
            os.replace(got, local)
            counts["downloaded"] += 1
            counts["bytes_downloaded"] += size
        st = local.stat()
        verified[local.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": f.sha256}
        write_json_atomic(metadata_dir / VERIFIED_FILE, verified)
    shutil.rmtree(staging, ignore_errors=True)
    return counts


# --- images -----------------------------------------------------------------------------------
def img2dataset_arguments(metadata_dir: Path, shards_dir: Path, s: ImageSettings) -> dict:
    """The keyword arguments of `img2dataset.download`, DataComp's plus incremental mode."""
    return dict(
        url_list=str(metadata_dir), input_format="parquet", url_col="url", caption_col="text",
        bbox_col="face_bboxes" if s.blur_faces else None, save_additional_columns=["uid"],
        output_format="webdataset", output_folder=str(shards_dir), image_size=s.image_size,
        resize_mode=s.resize_mode, resize_only_if_bigger=s.resize_only_if_bigger,
        encode_format=s.encode_format, encode_quality=s.encode_quality,
        number_sample_per_shard=s.number_sample_per_shard, processes_count=s.processes_count,
        thread_count=s.thread_count, oom_shard_count=s.oom_shard_count, retries=s.retries,
        timeout=s.timeout, incremental_mode="incremental", enable_wandb=False,
        wandb_project="datacomp", distributor="multiprocessing",
    )


def download_images(metadata_dir: Path, shards_dir: Path, settings: ImageSettings) -> None:
    from img2dataset import download

    if not any(metadata_dir.glob("*.parquet")):
        raise FileNotFoundError(f"{metadata_dir} holds no parquet files to download images for")
    shards_dir.mkdir(parents=True, exist_ok=True)
    download(**img2dataset_arguments(metadata_dir, shards_dir, settings))


def summarize_shards(shards_dir: Path) -> dict:
    """Successes and failures (by reason) per shard and in total, from img2dataset's _stats.json."""
    per_shard, totals, reasons = {}, {"count": 0, "successes": 0, "failed_to_download": 0,
                                      "failed_to_resize": 0}, {}
    for stats_path in sorted(shards_dir.glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        shard = stats_path.name[: -len("_stats.json")]
        row = {k: int(stats.get(k, 0)) for k in totals}
        per_shard[shard] = {**row, "status_dict": stats.get("status_dict", {})}
        for k in totals:
            totals[k] += row[k]
        for reason, n in stats.get("status_dict", {}).items():
            if reason != "success":
                reasons[reason] = reasons.get(reason, 0) + int(n)
    unfinished = sorted(p.name for p in shards_dir.glob("*.tar")
                        if not (shards_dir / (p.stem + "_stats.json")).is_file())
    accounted = totals["successes"] + totals["failed_to_download"] + totals["failed_to_resize"]
    return {**totals, "accounted": accounted == totals["count"], "failure_reasons": reasons,
            "shards": len(per_shard), "unfinished_shards": unfinished, "per_shard": per_shard}


# --- command line -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    root = Pool(args.data_root)
    start = time.perf_counter()
    summary: dict = {"data_root": str(root.root)}
    if args.metadata_dir is not None:
        metadata_dir = args.metadata_dir
    else:
        repo = args.repo_id or repo_id_for(args.scale)
        endpoint = args.hf_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        metadata_dir = root.metadata_dir
        summary["metadata"] = {"repo_id": repo, "endpoint": endpoint,
                               **download_metadata(repo, metadata_dir, endpoint=endpoint, npz=args.npz,
                                                   revision=args.revision)}
        print(f"metadata: {summary['metadata']['downloaded']} file(s) downloaded, "
              f"{summary['metadata']['already_present']} already present and verified, in {metadata_dir}")
    if not args.skip_images:
        settings = ImageSettings(processes_count=args.processes_count, thread_count=args.thread_count,
                                 retries=args.retries, timeout=args.timeout,
                                 number_sample_per_shard=args.shard_size, blur_faces=not args.skip_bbox_blurring,
                                 image_size=args.image_size)
        download_images(metadata_dir, root.shards_dir, settings)
        shards = summarize_shards(root.shards_dir)
        summary["images"] = {"settings": asdict(settings), **shards}
        print(f"images: {shards['successes']} of {shards['count']} downloaded in {shards['shards']} shard(s) "
              f"({shards['failed_to_download']} failed to download, {shards['failed_to_resize']} failed "
              f"to resize) in {root.shards_dir}")
        for reason, n in sorted(shards["failure_reasons"].items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {n:>8}  {reason}")
    summary["elapsed_s"] = round(time.perf_counter() - start, 3)
    write_json_atomic(root.root / "download_summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pools.download", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m pools.download --scale small --data-root data/small --npz\n"
               "  python -m pools.download --scale small --data-root data/small --skip-images\n"
               "  HF_ENDPOINT=https://hf-mirror.example python -m pools.download --scale medium --data-root d\n"
               "  python -m pools.download --metadata-dir my_parquets --data-root data/byod   # your own URLs")
    where = parser.add_argument_group("what to download")
    where.add_argument("--scale", choices=HUB_SCALES, help="CommonPool scale: picks mlfoundations/datacomp_<scale>")
    where.add_argument("--repo-id", help="another hub dataset repo with CommonPool-format files")
    where.add_argument("--revision", default=None, help="hub revision (branch, tag or commit; default main)")
    where.add_argument("--hf-endpoint", default=None, help="hub URL (default: $HF_ENDPOINT or huggingface.co)")
    where.add_argument("--metadata-dir", type=Path, default=None,
                       help="use these parquets (url, text, uid columns) instead of the hub: downloads their images")
    where.add_argument("--data-root", type=Path, required=True, help="pool folder to create or complete")
    where.add_argument("--npz", action="store_true", help="also download the npz embeddings (large)")
    where.add_argument("--skip-images", action="store_true", help="metadata only (what every filter needs)")
    img = parser.add_argument_group("images (img2dataset; defaults are DataComp's)")
    img.add_argument("--processes-count", type=int, default=16, help="(default %(default)s)")
    img.add_argument("--thread-count", type=int, default=128, help="(default %(default)s)")
    img.add_argument("--retries", type=int, default=2, help="(default %(default)s)")
    img.add_argument("--timeout", type=int, default=10, help="seconds per image request (default %(default)s)")
    img.add_argument("--shard-size", type=int, default=SAMPLES_PER_SHARD, help="input rows per shard (default %(default)s)")
    img.add_argument("--image-size", type=int, default=512, help="(default %(default)s)")
    img.add_argument("--skip-bbox-blurring", action="store_true", help="do not blur the face boxes")
    args = parser.parse_args(argv)
    if args.metadata_dir is None and args.scale is None and args.repo_id is None:
        parser.error("give --scale (or --repo-id), or --metadata-dir for your own parquets")
    from pools.cli import one_line_errors

    with one_line_errors(argv, HubError, OSError):  # no network, a bad mirror, a folder that cannot be written
        return run(args)


if __name__ == "__main__":
    main()
