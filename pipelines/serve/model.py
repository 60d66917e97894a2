"""The model deployment: every member of the ensemble in one replica, one hop from the ingress.

A request arrives as the encoded upload (tens of KB, not the decoded image); the replica decodes it,
batches it with concurrent images of the same size (`@serve.batch`), runs the whole ensemble
(`segmodels.artifact.load_model_dir`: probabilities averaged with the model's weights) and renders the
answer. Only with the CRF do probabilities leave the replica, once per request, as float16.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict

import numpy as np
from ray import serve

from pipelines.errors import UserError
from pipelines.model_uri import ModelUri, fetched_model
from pipelines.serve.config import ServeConfig, batch_knobs
from pipelines.serve.refs import ModelRef
from pipelines.serve.render import Dense, Reply, error_reply, render
from pipelines.serve.uploads import ApiError, decode_upload

logger = logging.getLogger("ray.serve")

# Model versions a replica keeps loaded: the current one and the one in-flight requests may still use.
KEEP_VERSIONS = 2


@serve.deployment
class SegmentationModel:
    """Encoded JPEG/PNG bytes -> a finished Reply (or a `Dense` result for the CRF pool), batched.

    Versions load on first use (or ahead of traffic via `load`) and the `KEEP_VERSIONS` most recent stay
    loaded, so requests still on the previous version keep being answered during a hot update.
    """

    def __init__(self, cfg: ServeConfig, model: ModelRef):
        import torch

        # `build_app` sizes replica_threads from the node; a replica built directly follows member_cpus.
        self.threads = cfg.replica_threads or max(1, round(cfg.member_cpus))
        torch.set_num_threads(self.threads)
        self.cfg, self.initial_source = cfg, model.source
        followed = ModelUri.parse(cfg.model_uri)
        self.registry = followed.name if followed.kind == "registry" else ""
        self.device = "cuda" if cfg.member_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.loaded: OrderedDict[str, object] = OrderedDict()  # source -> segmodels LoadedModel
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reconfigure(
            {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}
        )
        self.model(model.source)

    def reconfigure(self, config: dict) -> None:
        """Serve's `user_config` hook: batch size and wait, changed live (`serve deploy` restarts nothing)."""
        self.knobs = batch_knobs(config)
        self.batched.set_max_batch_size(self.knobs.max_batch_size)
        logger.info("batching: %s", self.knobs)

    async def describe(self) -> dict:
        """This replica's runtime knobs and loaded versions (for operators, through a DeploymentHandle)."""
        context = serve.get_replica_context()
        return {
            "replica": context.replica_id.unique_id,
            "max_batch_size": self.knobs.max_batch_size,
            "batch_wait_timeout_s": self.knobs.batch_wait_timeout_s,
            "loaded": list(self.loaded),
            "device": self.device,
            "threads": self.threads,
        }

    def check_source(self, source: str) -> None:
        """Only the operator's model, or another version of the same registered model, may be loaded."""
        try:
            version = bool(self.registry) and ModelUri.parse(source).is_version_of(self.registry)
        except UserError:
            version = False
        if source != self.initial_source and not version:
            raise ValueError(f"refusing to load {source!r}: this endpoint serves {self.cfg.model_uri!r}")

    def model(self, source: str):
        """Model `source` as a segmodels LoadedModel (all members, averaged by `.ensemble`)."""
        from segmodels.artifact import load_model_dir

        with self.lock:
            if source in self.loaded:
                self.loaded.move_to_end(source)
                return self.loaded[source]
            self.check_source(source)
            with fetched_model(source, self.cfg.tracking_uri) as folder:
                model = load_model_dir(folder, self.device)
            self.loaded[source] = model
            while len(self.loaded) > KEEP_VERSIONS:
                self.loaded.popitem(last=False)
            archs = [m.arch for m in model.spec.members]
            logger.info("loaded %s (%s) on %s", source, ", ".join(archs), self.device)
            return model

    async def load(self, source: str) -> None:
        """Load a version ahead of traffic (the ingress calls this before switching to it)."""
        await asyncio.to_thread(self.model, source)

    async def segment(self, data: bytes, source: str, version: str, fmt: str, dense: bool) -> Reply | Dense:
        """One upload -> its Reply; with `dense`, the image and float16 probabilities for the CRF instead."""
        started = time.perf_counter()
        try:
            image = await asyncio.to_thread(decode_upload, data, self.cfg.max_pixels)
        except ApiError as err:
            return error_reply(err)
        decoded = time.perf_counter()
        result = await self.predict(image, source, dense)
        seconds = {"decode": decoded - started, "inference": time.perf_counter() - decoded}
        spec = self.loaded[source].spec if source in self.loaded else self.model(source).spec
        if dense:
            return Dense(image, result, spec, version, seconds)
        return await asyncio.to_thread(render, image, result, spec, version, fmt, seconds)

    async def predict(self, image: np.ndarray, source: str, dense: bool) -> np.ndarray:
        """H,W,3 uint8 -> uint8 H,W labels, or float16 C,H,W probabilities when `dense`.

        Waits up to `batch_wait_timeout_s` for companions only while other requests are in flight here: an
        idle replica starts at once, a busy one fills its next batch.
        """
        self.in_flight += 1
        try:
            self.batched.set_batch_wait_timeout_s(
                self.knobs.batch_wait_timeout_s if self.in_flight > 1 else 0.0
            )
            result = await self.batched(image, source, dense)
        finally:
            self.in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    # Two batches at once: while one runs its forward, the next one's requests are decoded and the last
    # one's answers rendered and sent, so under load the cores never wait for those hops (size and wait
    # are reset by reconfigure).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def batched(self, images: list[np.ndarray], sources: list[str], dense: list[bool]) -> list:
        # In a thread, so the replica keeps accepting requests (the next batch) while this one computes.
        return await asyncio.to_thread(self.predict_batch, images, sources, dense)

    def predict_batch(self, images: list[np.ndarray], sources: list[str], dense: list[bool]) -> list:
        """One forward pass of the ensemble per (version, image size) group of the batch.

        A group that fails (say, a version that cannot be loaded) gets its exception as its results, so the
        other requests batched with it are still answered.
        """
        import torch

        from pipelines.inference.core import InferenceSettings, predict_batch

        groups: dict[tuple, list[int]] = {}
        for i, (image, source) in enumerate(zip(images, sources, strict=True)):
            groups.setdefault((source, image.shape), []).append(i)
        results: list = [None] * len(images)
        for (source, _), positions in groups.items():
            try:
                stack = np.stack([images[i] for i in positions])
                probs = predict_batch(self.model(source), stack, InferenceSettings())
                # max(0).indices, not argmax: about 4x faster on CPU for C,H,W maps.
                labels = probs.max(1).indices.to(torch.uint8).cpu().numpy()
            except Exception as err:
                logger.exception("model %s failed", source)
                for i in positions:
                    results[i] = err
                continue
            for k, i in enumerate(positions):
                results[i] = probs[k].half().cpu().numpy() if dense[i] else labels[k]
        return results
