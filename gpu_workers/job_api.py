"""The worker's side of job I/O: inputs, adapters and artifacts move through the farm API, authenticated by each
job attempt's own token (`farm.job_tokens`). Workers hold no database or storage credentials."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import requests

# (connect, read) seconds: a stalled transfer fails the attempt (which is retried) instead of hanging it.
TIMEOUT = (10.0, 300.0)


class JobApi:
    def __init__(self, *, base_url: str, token: str, job_id: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.job_id = job_id
        self._headers = {"Authorization": f"Bearer {token}"}

    def download(self, path: str, destination: Path) -> Path:
        """Streams `GET <api><path>` into `destination` (written to a temporary name, then renamed)."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        with requests.get(self.base_url + path, headers=self._headers, stream=True, timeout=TIMEOUT) as response:
            response.raise_for_status()
            fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
            with os.fdopen(fd, "wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
        os.replace(tmp, destination)
        return destination

    def input_file(self, file_id: str, destination: Path) -> Path:
        return self.download(f"/api/jobs/{self.job_id}/files/{file_id}/content", destination)

    def adapter_tar(self, destination: Path) -> Path:
        return self.download(f"/api/jobs/{self.job_id}/adapter", destination)

    def upload_artifact(self, name: str, path: Path) -> dict:
        """Uploads one artifact of this attempt; returns the API's answer (`{"file_id": ...}`)."""
        with path.open("rb") as handle:
            response = requests.post(
                f"{self.base_url}/api/job-artifacts",
                headers=self._headers,
                data={"name": name},
                files={"file": (path.name, handle, "application/x-tar")},
                timeout=TIMEOUT,
            )
        response.raise_for_status()
        return response.json()


def pack_directory(directory: Path, archive: Path) -> Path:
    """The directory's files as a flat tar (adapters are a few files: config + safetensors)."""
    with tarfile.open(archive, "w") as tar:
        for item in sorted(directory.iterdir()):
            if item.is_file():
                tar.add(item, arcname=item.name)
    return archive


def unpack_archive(archive: Path, directory: Path) -> Path:
    """Extracts a flat tar made by `pack_directory` into `directory` (regular files only, no paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                continue
            source = tar.extractfile(member)
            if source is not None:
                with (directory / member.name).open("wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
    return directory


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A flat tar of in-memory files (tests)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
