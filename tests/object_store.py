"""A loopback S3 server for the object-storage tests: moto's server mode on 127.0.0.1.

`loopback_s3` starts it on a free port, points the AWS variables of this process at it (the
ones `pools.storage` documents; subprocesses inherit them), yields the endpoint, and restores
the environment and stops the server afterwards. Nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*ACCESS, "AWS_ENDPOINT_URL")}
    os.environ.update(ACCESS, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def create_bucket(name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)


def upload_folder(local: Path, uri: str) -> None:
    """Copy a local folder to ``s3://bucket/prefix`` (independently of the code under test's
    writers: pyarrow's own copy)."""
    import pyarrow.fs as pafs

    from pools import storage

    target = storage.path(uri)
    pafs.copy_files(str(local), target.key, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=storage.filesystem("s3"))


def object_bytes(uri: str) -> dict[str, bytes]:
    """{name: bytes} of the objects directly under a prefix, read with boto3 (not pyarrow)."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/",
                                                                 Delimiter="/"):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1]
            if name:  # not a folder marker
                out[name] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out
