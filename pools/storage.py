"""Where a pool and its outputs live: a local folder, or a prefix in object storage.

``--pool s3://bucket/pool`` (or ``gs://bucket/pool``) names a pool in object storage; every
command that reads a pool or writes an output takes such a URI wherever it takes a folder.
`path` turns a command-line string into a path object: a local one stays a `pathlib.Path`
(nothing about local runs changes), a URI becomes an `ObjectPath`, which has the parts of
pathlib's interface the pipeline uses (``/``, ``name``, ``stem``, ``with_suffix``,
``is_file``, ``glob``, ``read_text`` ...) over pyarrow's filesystems (``pyarrow.fs``: S3 and
Google Cloud Storage, built into the pyarrow wheel the project already needs; no other client
library). An `ObjectPath` has no ``__fspath__``, so code that would treat it as a local file
fails loudly instead of writing a local folder named ``s3:``.

Readers go through `readable` (parquet footers and column chunks by range requests),
`whole` (an npz or npy, in one request) and `open_stream` (a tar, streamed). Writers keep using
`pools.files.atomic_path`: for an object it yields a local temporary file, uploads it under a
temporary key beside the final one (``.<name>.tmp-<pid>@<host>-<random>``), checks its size,
then copies it to its final key and deletes the temporary, so a reader never sees a
half-written object under its final name, and an object's presence marks finished work as a
renamed local file does.

Credentials and endpoint come from the environment, as the AWS SDK inside pyarrow reads them:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``
(``AWS_DEFAULT_REGION``), ``AWS_PROFILE`` and ``AWS_ENDPOINT_URL`` (an S3-compatible server:
MinIO, Ceph, moto); Google Cloud Storage reads ``GOOGLE_APPLICATION_CREDENTIALS``.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import re
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Iterator, Union

SCHEMES = ("s3", "gs")
_URI = re.compile(r"^(?P<scheme>s3|gs)://(?P<key>[^?#]*)$")
# What pathlib leaves of a URI (``Path("s3://b/k")`` is ``s3:/b/k``): a caller that wrapped a
# URI in Path (a `type=Path` flag, a library) hands that back, and `path` repairs it.
_FLATTENED = re.compile(r"^(?P<scheme>s3|gs):/(?P<key>[^/].*)$")
# The AWS SDK's settings that pick the credentials and server: a filesystem is made once per
# process for each combination of them (a test or notebook may change them between runs).
ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "GOOGLE_APPLICATION_CREDENTIALS")
STREAM_BUFFER = 8 << 20  # read-ahead for tars streamed from object storage


class StorageError(OSError):
    """Object storage refused or failed a request; the message names the URI."""


def path(value: Union[str, os.PathLike, "ObjectPath"]) -> Union[Path, "ObjectPath"]:
    """A local `Path`, or an `ObjectPath` for a URI (also as pathlib flattened it); use as an
    argparse ``type=`` for every flag that names a pool, a folder or a file."""
    if isinstance(value, ObjectPath):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    m = _URI.match(text) or (not isinstance(value, str) and _FLATTENED.match(text))
    if m:
        return ObjectPath(m["scheme"], m["key"])
    if re.match(r"^(s3|gs)://.*[?#]", text):
        raise ValueError(f"{text}: a URI takes no query; the server and credentials come from the environment "
                         "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    if "://" in text:
        raise ValueError(f"{text}: unsupported URI scheme; pools in object storage are "
                         f"{' or '.join(s + '://bucket/prefix' for s in SCHEMES)}")
    return value if isinstance(value, Path) else Path(text)


_FILESYSTEMS: dict[tuple, object] = {}


def filesystem(scheme: str, bucket: str | None = None):
    """The pyarrow filesystem of `scheme`, configured from the environment (made once per
    process, environment and, on AWS without a region set, bucket: its region is looked up)."""
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    per_bucket = scheme == "s3" and not endpoint and not region and bucket is not None
    key = (scheme, bucket if per_bucket else None, *(os.environ.get(v) for v in ENV_VARS))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        if scheme == "s3":
            kwargs = {}
            if endpoint:  # pyarrow reads it too, but an http:// server needs its scheme set
                scheme_, _, host = endpoint.partition("://")
                kwargs = {"endpoint_override": host or scheme_, "scheme": scheme_ if host else "https"}
            if region:
                kwargs["region"] = region
            elif per_bucket:
                try:
                    kwargs["region"] = pafs.resolve_s3_region(bucket)
                except OSError:
                    pass  # no such bucket, or no network: the request itself will say so
            fs = pafs.S3FileSystem(**kwargs)
        else:
            fs = pafs.GcsFileSystem()
        _FILESYSTEMS[key] = fs
    return fs


class ObjectPath:
    """An object or prefix in object storage, with the parts of `pathlib.Path` the pipeline
    uses. Pickles as its URI (the filesystem is looked up again where it is used)."""

    __slots__ = ("scheme", "key")

    def __init__(self, scheme: str, key: str):
        key = posixpath.normpath(key.strip("/")) if key.strip("/") else ""
        if not key or key.startswith(".."):
            raise ValueError(f"{scheme}://{key}: a URI needs a bucket, e.g. {scheme}://bucket/pool")
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "key", key)

    def __setattr__(self, name, value):
        raise AttributeError("ObjectPath is immutable")

    def __reduce__(self):
        return ObjectPath, (self.scheme, self.key)

    # --- pure path ---------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and (self.scheme, self.key) == (other.scheme, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.key))

    def __lt__(self, other: "ObjectPath") -> bool:
        return (self.scheme, self.key) < (other.scheme, other.key)

    def __truediv__(self, other: str | os.PathLike) -> "ObjectPath":
        return ObjectPath(self.scheme, f"{self.key}/{os.fspath(other)}")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.key).suffixes

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.scheme, posixpath.dirname(self.key)) if "/" in self.key else self

    def with_name(self, name: str) -> "ObjectPath":
        return ObjectPath(self.scheme, str(PurePosixPath(self.key).with_name(name)))

    def with_suffix(self, suffix: str) -> "ObjectPath":
        return ObjectPath(self.scheme, str(PurePosixPath(self.key).with_suffix(suffix)))

    # --- requests ----------------------------------------------------------------------------
    @property
    def fs(self):
        return filesystem(self.scheme, self.bucket)

    def _info(self):
        with _errors(self):
            return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        """Size and modification time (the fields `pools.files.file_fingerprint` reads)."""
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(f"{self} does not exist")
        mtime_ns = info.mtime_ns or 0
        return SimpleNamespace(st_size=info.size, st_mtime_ns=mtime_ns, st_mtime=mtime_ns / 1e9)

    def iterdir(self) -> Iterator["ObjectPath"]:
        """Objects and prefixes directly under this prefix (none when there is none)."""
        import pyarrow.fs as pafs

        with _errors(self):
            infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield ObjectPath(self.scheme, info.path)

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """`iterdir` filtered by a name pattern (one level, as the pipeline's globs are)."""
        if "/" in pattern:
            raise ValueError(f"{self}: only one-level globs are supported, not {pattern!r}")
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object storage has no folders, only keys with a common prefix."""

    def rmdir(self) -> None:
        """Nothing to do once the prefix holds no objects (it is gone with the last one)."""
        if any(True for _ in self.iterdir()):
            raise OSError(f"{self} is not empty")

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        with _errors(self):
            self.fs.delete_file(self.key)

    def open(self, mode: str = "rb", encoding: str | None = None):
        """Open an object for reading (writes go through `pools.files.atomic_path`)."""
        if mode not in ("r", "rb"):
            raise ValueError(f"{self}: objects are written through pools.files.atomic_path, not open({mode!r})")
        raw = readable(self)
        return io.TextIOWrapper(io.BufferedReader(_RawReader(raw)), encoding=encoding or "utf-8") if mode == "r" else raw

    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self, encoding: str = "utf-8") -> str:
        return read_bytes(self).decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        from pools.files import atomic_path

        with atomic_path(self) as tmp:
            tmp.write_bytes(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))


class _RawReader(io.RawIOBase):
    """A pyarrow input file as a Python raw stream (for text mode)."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


class _errors:
    """Turn pyarrow's errors about `target` into a `StorageError` / `FileNotFoundError` whose
    one-line message starts with the URI."""

    def __init__(self, target: ObjectPath):
        self.target = target

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or not isinstance(exc, OSError) or isinstance(exc, StorageError):
            return False
        reason = " ".join(str(exc).split())
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(f"{self.target} does not exist") from None
        if "NO_SUCH_BUCKET" in reason or "bucket does not exist" in reason.lower():
            raise StorageError(f"{self.target}: bucket {self.target.bucket!r} does not exist") from None
        hint = ""
        if any(w in reason for w in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
            hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the credentials of AWS_PROFILE)"
        elif any(w in reason for w in ("Couldn't connect", "connect to server", "NETWORK_CONNECTION", "curlCode")):
            hint = " (cannot reach the server: check AWS_ENDPOINT_URL)"
        raise StorageError(f"{self.target}: {reason}{hint}") from None


def check_bucket(target: ObjectPath) -> None:
    """Raise a `StorageError` naming `target` when its bucket does not exist (or these
    credentials cannot see it): a missing prefix alone just lists as empty."""
    import pyarrow.fs as pafs

    with _errors(target):
        missing = target.fs.get_file_info(target.bucket).type == pafs.FileType.NotFound
    if missing:
        raise StorageError(f"{target}: bucket {target.bucket!r} does not exist at "
                           f"{os.environ.get('AWS_ENDPOINT_URL') or 'the default endpoint'} (or these credentials "
                           "cannot see it)")


def readable(target: Union[str, os.PathLike, ObjectPath]):
    """What pyarrow and NumPy read from: a local path unchanged, or a seekable file over an
    object (each read is a range request)."""
    if not isinstance(target, ObjectPath):
        return target
    with _errors(target):
        return target.fs.open_input_file(target.key)


def open_stream(target: Union[str, os.PathLike, ObjectPath]):
    """A binary file for reading front to back (a tar): a local ``open``, or an object read
    ahead in large blocks."""
    target = path(target)
    if not isinstance(target, ObjectPath):
        return open(target, "rb")
    with _errors(target):
        return target.fs.open_input_stream(target.key, buffer_size=STREAM_BUFFER)


def whole(target: Union[str, os.PathLike, ObjectPath]):
    """What NumPy loads an npz or npy from: a local path unchanged, or an object's bytes in
    memory (one request; NumPy would read a zip member of an object in 256 KiB requests)."""
    target = path(target)
    return target if not isinstance(target, ObjectPath) else io.BytesIO(read_bytes(target))


def read_bytes(target: Union[str, os.PathLike, ObjectPath]) -> bytes:
    """The whole content of a file or object (one request for an object)."""
    target = path(target)
    if not isinstance(target, ObjectPath):
        return target.read_bytes()
    with _errors(target):
        with target.fs.open_input_stream(target.key) as f:
            return f.readall()


def download(source: Union[Path, ObjectPath], local: Path) -> None:
    """Copy a file or an object to a local file."""
    if not isinstance(source, ObjectPath):
        import shutil

        shutil.copyfile(source, local)
        return
    import pyarrow.fs as pafs

    with _errors(source):
        pafs.copy_files(source.key, str(local), source_filesystem=source.fs,
                        destination_filesystem=pafs.LocalFileSystem())


def upload_atomic(local_file: Path, target: ObjectPath, temporary_name: str) -> None:
    """Put `local_file` at `target`: uploaded under `temporary_name` beside it, size checked,
    then copied to its final key (so the final key only ever holds a complete object)."""
    import pyarrow.fs as pafs

    fs = target.fs
    staged = target.with_name(temporary_name)
    size = os.path.getsize(local_file)
    moved = False
    try:
        with _errors(staged):
            pafs.copy_files(str(local_file), staged.key, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            uploaded = fs.get_file_info(staged.key).size
        if uploaded != size:
            raise StorageError(f"{target}: upload incomplete ({uploaded} of {size} bytes); run again")
        with _errors(target):
            fs.move(staged.key, target.key)  # S3: a server-side copy, then the temporary's deletion
        moved = True
    finally:
        if not moved:
            try:
                fs.delete_file(staged.key)
            except OSError:
                pass  # never written


def upload_folder(local: Path, target: ObjectPath) -> None:
    """Put every file under the local folder `local` at the same relative key under `target`,
    each atomically (`pools.files.atomic_path`); a caller writes its completion marker after."""
    import shutil

    from pools.files import atomic_path

    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        with atomic_path(target / f.relative_to(local).as_posix()) as tmp:
            shutil.copyfile(f, tmp)


def scratch_dir(beside: Union[Path, ObjectPath], name: str) -> Path:
    """A local folder for a writer's scratch files (sorted runs, spilled keys): beside the
    output when that is local, in the system's temporary folder when it is an object."""
    if not isinstance(beside, ObjectPath):
        return Path(beside) / name
    # one level, so that removing the folder leaves nothing behind
    return Path(tempfile.gettempdir()) / f"datacomp-scratch-{uuid.uuid5(uuid.NAMESPACE_URL, str(beside)).hex[:12]}{name}"


def rmtree(target: Union[Path, ObjectPath]) -> None:
    """Delete a folder, or every object under a prefix."""
    if not isinstance(target, ObjectPath):
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        return
    if target.exists():
        with _errors(target):
            target.fs.delete_dir(target.key)  # with the empty "folder" marker pyarrow may leave


def replace(source: Union[Path, ObjectPath], target: Union[Path, ObjectPath]) -> None:
    """`os.replace` for files and objects (object to object: a server-side copy, then delete)."""
    if isinstance(source, ObjectPath) != isinstance(target, ObjectPath):
        raise ValueError(f"cannot move {source} to {target}: one is local, the other an object")
    if not isinstance(source, ObjectPath):
        os.replace(source, target)
        return
    with _errors(source):
        source.fs.move(source.key, target.key)
