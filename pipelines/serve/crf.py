"""The CRF pool: DeepLab's dense CRF (ICLR 2015, section 4) in its own autoscaled 1-CPU replicas.

pydensecrf holds the GIL for its whole run, so it never runs in the ingress or the model replica: the
ingress hands the model replica's `Dense` result (passed along as a DeploymentResponse, so the
probabilities go from the model replica to a CRF replica without passing through the ingress) to this
deployment, which refines, takes the labels and renders the answer. Without `--crf` it is not deployed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ray import serve

from pipelines.errors import UserError
from pipelines.inference.core import crf_params
from pipelines.serve.render import Dense, Reply, render

logger = logging.getLogger("ray.serve")


@serve.deployment
class CRFRefiner:
    """Dense -> Reply: probabilities refined by the dense CRF, argmax, rendered (png|json|overlay)."""

    def __init__(self) -> None:
        self.overrides: dict = {}

    def reconfigure(self, config: dict) -> None:
        """Serve's `user_config` hook: CRF parameter overrides (iterations, w1, theta_alpha, ...), live."""
        from segmodels.crf import CRFParams

        known = {f.name for f in dataclasses.fields(CRFParams)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(
                f"CRFRefiner user_config: unknown key(s) {unknown}; valid: {', '.join(sorted(known))}"
            )
        crf_params(None, config)  # a bad value raises UserError naming it
        self.overrides = dict(config)
        logger.info("CRF parameter overrides: %s", self.overrides)

    async def refine(self, result: Dense | Reply, fmt: str) -> Reply:
        """A Reply from the model replica (an error) passes through; a Dense result is refined and rendered."""
        if isinstance(result, Reply):
            return result
        return await asyncio.to_thread(self.refine_dense, result, fmt)

    def refine_dense(self, result: Dense, fmt: str) -> Reply:
        import torch

        from segmodels.crf import dense_crf

        started = time.perf_counter()
        params = crf_params(result.spec.crf, self.overrides)
        probs = dense_crf(result.image, result.probs, params)
        mask = torch.from_numpy(probs).max(0).indices.to(torch.uint8).numpy()
        seconds = {**result.seconds, "crf": time.perf_counter() - started}
        return render(result.image, mask, result.spec, result.version, fmt, seconds)
