"""Promotion stage: champion vs challenger on the same frozen split; the alias moves only on a real win.

Both versions are scored by the evaluation stage on the same prepared split (its fingerprint is recorded),
both scores are written on the model versions as tags, and `champion` is moved to the challenger only when
there is no champion yet or the challenger's mIoU beats it by more than `margin`. Aliases, never stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.inference.core import InferenceSettings
from pipelines.inference.evaluate import EvalConfig, evaluate


@dataclass(frozen=True)
class PromoteConfig:
    name: str
    data: str
    margin: float = 0.0
    split: str = "val"
    tracking_uri: str = ""
    settings: InferenceSettings = InferenceSettings()


def promote(cfg: PromoteConfig) -> dict[str, Any]:
    """Evaluate `challenger` and `champion` of registered model `cfg.name`; move `champion` if warranted."""
    from pipelines.data.dataset import open_prepared

    if cfg.margin < 0:
        raise UserError(f"--margin must be >= 0, got {cfg.margin}")
    data = open_prepared(cfg.data)
    client = tracking.connect(cfg.tracking_uri)
    challenger = tracking.alias_version(client, cfg.name, "challenger")
    if challenger is None:
        raise UserError(
            f"registered model {cfg.name!r} has no 'challenger' alias in {client.tracking_uri}; "
            "run `segpipe ensemble --register-as NAME` first"
        )
    champion = tracking.alias_version(client, cfg.name, "champion")

    def score(version: str) -> float:
        result = evaluate(
            EvalConfig(
                model_uri=f"models:/{cfg.name}/{version}",
                data=cfg.data,
                split=cfg.split,
                settings=cfg.settings,
                tracking_uri=cfg.tracking_uri,
            )
        )
        miou = result["metrics"]["miou"]
        client.set_model_version_tag(cfg.name, version, f"eval_{cfg.split}_miou", f"{miou:.6f}")
        client.set_model_version_tag(cfg.name, version, f"eval_{cfg.split}_fingerprint", data.fingerprint)
        return miou

    challenger_miou = score(challenger)
    champion_miou = score(champion) if champion is not None and champion != challenger else None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion == challenger:
        promoted, reason = False, "challenger is already the champion"
    else:
        promoted = challenger_miou > champion_miou + cfg.margin
        reason = (
            f"challenger mIoU {challenger_miou:.4f} vs champion {champion_miou:.4f} "
            f"(margin {cfg.margin}): {'promoted' if promoted else 'kept champion'}"
        )
    if promoted:
        tracking.set_alias(client, cfg.name, "champion", challenger)
    client.set_model_version_tag(cfg.name, challenger, "promotion", "promoted" if promoted else "rejected")
    return {
        "name": cfg.name,
        "challenger": {"version": challenger, "miou": challenger_miou},
        "champion": {"version": champion, "miou": champion_miou},
        "promoted": promoted,
        "reason": reason,
        "champion_version": challenger if promoted else champion,
        "split": cfg.split,
        "dataset_fingerprint": data.fingerprint,
    }
