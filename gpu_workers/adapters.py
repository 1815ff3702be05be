"""LoRA adapters of fine-tuned models on a serving worker: fetched once through the API (with the job's token),
cached on local disk, attached to the request so vLLM loads and applies them (`LoRARequest`).

Choice: the worker pulls the adapter through the API rather than reading the shared model directory, so a worker
on another machine needs no access to the farm's file storage; the cache makes it a one-time cost per adapter."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import requests

from gpu_workers.engine import Engine, EngineInputError, LoraAdapter, PreparedRequest
from gpu_workers.job_api import JobApi, unpack_archive

log = logging.getLogger(__name__)


class AdapterCache:
    def __init__(self, *, api_url: str, directory: Path) -> None:
        self.api_url = api_url
        self.directory = directory
        self._lock = threading.Lock()

    def path(self, *, job_id: str, adapter: dict[str, Any]) -> Path:
        """The adapter's local directory, downloading it on first use (one download at a time per worker)."""
        # Keyed by the adapter's file id: unique across the farm's life (model ids restart with a new database).
        target = self.directory / "".join(c for c in str(adapter["file_id"]) if c.isalnum() or c in "-_")
        if (target / "adapter_config.json").is_file():
            return target
        with self._lock:
            if (target / "adapter_config.json").is_file():
                return target
            self.directory.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(dir=self.directory, prefix=".fetch-"))
            try:
                api = JobApi(base_url=self.api_url, token=adapter["token"], job_id=job_id)
                try:
                    archive = api.adapter_tar(scratch / "adapter.tar")
                except requests.HTTPError as exc:  # deleted adapter file: no retry can help (other errors retry)
                    if exc.response is not None and exc.response.status_code == 404:
                        raise EngineInputError(
                            f"The adapter of `{adapter['name']}` is gone (its file was deleted).",
                            code="adapter_not_found",
                        ) from exc
                    raise
                unpacked = unpack_archive(archive, scratch / "adapter")
                if not (unpacked / "adapter_config.json").is_file():
                    raise EngineInputError(
                        f"adapter of {adapter['name']} has no adapter_config.json", code="invalid_adapter"
                    )
                if target.exists():
                    shutil.rmtree(target)
                unpacked.replace(target)
                log.info("adapter %s (id %s) cached in %s", adapter["name"], adapter["lora_id"], target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return target

    def attach(
        self, engine: Engine, prepared: PreparedRequest, *, job_id: str, adapter: dict[str, Any]
    ) -> PreparedRequest:
        """The request with its adapter; a 400 when this spec's engine was started without LoRA."""
        if not getattr(engine, "supports_adapters", False):
            raise EngineInputError(
                f"The model `{adapter['name']}` needs LoRA, which this deployment's engine for its "
                "base model does not enable (set enable_lora in the spec's engine args).",
                code="adapter_unsupported",
            )
        local = LoraAdapter(
            name=adapter["name"], lora_id=int(adapter["lora_id"]), path=self.path(job_id=job_id, adapter=adapter)
        )
        return dataclasses.replace(prepared, adapter=local)
