"""Registration of a selected ensemble: flatten the chosen candidates into one model folder, log, register.

Every chosen candidate may itself be an ensemble: its members are copied with their weights multiplied
by the candidate's, so the result is one self-describing folder of plain members.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import tracking


def flatten_members(chosen: list[int], weights: list[float], uris: list[str], folders: list[Path], specs):
    """(MemberSpecs, member weights, state dicts) of the chosen candidates, weights multiplied through."""
    from safetensors.torch import load_file

    members, member_weights, states = [], [], []
    for c, w in zip(chosen, weights, strict=True):
        for m, mw in zip(specs[c].members, specs[c].ensemble_weights, strict=True):
            # Everything of the member (architecture, arguments, input convention) but its file and source.
            members.append(replace(m, weights=f"member{len(members)}.safetensors", source=uris[c]))
            member_weights.append(w * mw / sum(specs[c].ensemble_weights))
            states.append(load_file(str(folders[c] / m.weights)))
    return members, member_weights, states


def register_ensemble(
    client,
    *,
    spec,
    states: list,
    experiment: str,
    register_as: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    description: str,
    tags: dict[str, str],
    parent_run_id: str = "",
) -> tuple[str, str]:
    """Log an ensemble run with `params` and `metrics`, then the model folder: registered as a new version
    of `register_as` with alias `challenger`, or as the run's artifact when `register_as` is empty.
    Returns (model URI, run id)."""
    from segmodels.artifact import save_model_dir

    run_id, _ = tracking.start_or_resume_run(
        client, experiment, "", tags={"segpipe.stage": "ensemble"}, parent_run_id=parent_run_id or None
    )
    tracking.log_params(client, run_id, params)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(Path(tmp) / "model", spec, states)
        if register_as:
            version = tracking.register_model_folder(
                client,
                register_as,
                folder,
                run_id=run_id,
                description=description,
                tags=tags,
                metrics=metrics,
            )
            tracking.set_alias(client, register_as, "challenger", version.version)
            model_uri = f"models:/{register_as}/{version.version}"
        else:
            model_uri = tracking.log_model_folder(client, run_id, folder, metrics=metrics)
    client.set_terminated(run_id, status="FINISHED")
    return model_uri, run_id
