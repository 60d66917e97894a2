"""Candidate scoring: every candidate's class probabilities on a split, written as bounded shards.

A pool of Ray Data actors (one GPU each when the cluster has GPUs, else one CPU: `model_actors`) holds
every candidate model once and scores batches of images, in forward passes bounded by a pixel budget
(`pipelines.inference.core.forward_batches`). Of each image it keeps only what selection and the CRF search
need: the candidates' probabilities and the label on the grid of every `stride`-th pixel (the networks'
output stride: DeepLab, FCN-8s and PSPNet predict at 1/8 of the input, so little is lost) as float16,
plus the encoded image and mask. One batch becomes one `.npz` shard in the scratch folder (local or
s3://); the driver only ever sees shard names.

Shard arrays: `probs` float16 K,C,P (candidates, classes, grid pixels of all images one after another),
`truth` uint8 P, `grid` int64 N,2 (each image's grid height and width), `image_id` str N, and the
encoded images and masks as `image_bytes` / `mask_bytes` uint8 buffers cut by `*_offsets` int64 N+1.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines import storage
from pipelines.inference.core import InferenceSettings


@dataclass(frozen=True)
class Shard:
    """One scored batch: where its file is and how many images it holds."""

    uri: str
    first_id: str
    images: int


def grid_slice(stride: int) -> slice:
    """Rows/columns of the selection grid: every `stride`-th pixel, starting mid-cell (stride 1: all)."""
    return slice(stride // 2, None, stride)


def pack(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings -> (one uint8 buffer, int64 offsets N+1), so npz needs no pickled objects."""
    offsets = np.cumsum([0] + [len(c) for c in chunks]).astype(np.int64)
    return np.frombuffer(b"".join(chunks), np.uint8), offsets


def unpack(buffer: np.ndarray, offsets: np.ndarray, index: int) -> bytes:
    return buffer[offsets[index] : offsets[index + 1]].tobytes()


def write_shard(uri: str, arrays: dict[str, np.ndarray]) -> None:
    out = io.BytesIO()
    np.savez(out, **arrays)
    storage.write_bytes(uri, out.getvalue())


def read_shard(uri: str) -> dict[str, np.ndarray]:
    """A shard's arrays (never unpickled)."""
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def image_probs(shard: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Per image, the candidates' probabilities on its grid: float32 K,C,h,w."""
    ends = np.cumsum([h * w for h, w in shard["grid"]], dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return [
        shard["probs"][:, :, s:e].astype(np.float32).reshape(*shard["probs"].shape[:2], h, w)
        for s, e, (h, w) in zip(starts, ends, shard["grid"], strict=True)
    ]


class ScoreCandidates:
    """Ray Data actor: every candidate model loaded once; one batch of images in, one shard written."""

    def __init__(self, payload_refs, out: str, stride: int, device: str, threads: int = 1):
        import ray
        import torch

        from pipelines.inference.core import materialize
        from segmodels.artifact import load_model_dir

        torch.set_num_threads(threads)
        # The refs travel inside a list so Ray hands them over unresolved; fetched once per actor.
        self.models = [load_model_dir(materialize(ray.get(ref)), device) for ref in payload_refs[0]]
        self.out, self.stride = out, stride
        self.settings = InferenceSettings()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.data.dataset import decode_mask
        from pipelines.images import decode_image
        from pipelines.inference.core import forward_batches, predict_batch

        images = [decode_image(b) for b in batch["image"]]
        cut = grid_slice(self.stride)
        per_image: list[np.ndarray | None] = [None] * len(images)
        shapes = [image.shape for image in images]
        # Images of one size share a forward pass per model, within the pixel budget of the widest padding.
        passes = max((forward_batches(m, shapes, self.settings) for m in self.models), key=len)
        for indices in passes:
            stacked = np.stack([images[i] for i in indices])
            probs = np.stack(
                [
                    predict_batch(model, stacked, self.settings)[:, :, cut, cut].half().cpu().numpy()
                    for model in self.models
                ],
                axis=1,
            )  # N,K,C,h,w
            for i, p in zip(indices, probs, strict=True):
                per_image[i] = p
        truths = [decode_mask(b)[cut, cut] for b in batch["mask"]]
        image_bytes, image_offsets = pack([bytes(b) for b in batch["image"]])
        mask_bytes, mask_offsets = pack([bytes(b) for b in batch["mask"]])
        uri = storage.join(self.out, f"shard-{uuid.uuid4().hex}.npz")
        write_shard(
            uri,
            {
                "probs": np.concatenate([p.reshape(*p.shape[:2], -1) for p in per_image], axis=2),
                "truth": np.concatenate([t.reshape(-1) for t in truths]),
                "grid": np.array([t.shape for t in truths], dtype=np.int64).reshape(-1, 2),
                "image_id": np.asarray(batch["image_id"]).astype(str),
                "image_bytes": image_bytes,
                "image_offsets": image_offsets,
                "mask_bytes": mask_bytes,
                "mask_offsets": mask_offsets,
            },
        )
        first = str(min(np.asarray(batch["image_id"]).astype(str)))
        return {"shard": np.array([uri]), "first_id": np.array([first]), "images": np.array([len(images)])}


def score_candidates(
    folders: list[Path],
    data,
    split: str,
    out: str,
    *,
    stride: int = 8,
    max_images: int = 0,
    images_per_shard: int = 8,
    concurrency: int = 0,
    num_gpus: float | None = None,
) -> list[Shard]:
    """Score every candidate model folder on `split` into shards under `out`; shards sorted by first image.

    `num_gpus` per actor as `model_actors` takes it (None: one each when the cluster has GPUs); a split
    of a few shards gets one actor per shard.
    """
    import ray
    import ray.data

    from pipelines.inference.core import model_payload
    from pipelines.progress import progress
    from pipelines.runtime import ensure_ray, model_actors

    ensure_ray()
    actors = model_actors(num_gpus)
    ds = data.split(split)
    if max_images:
        ds = ds.limit(max_images)
    workers = actors.pool(data.rows(split, max_images), images_per_shard, concurrency)
    payload_refs = [[ray.put(model_payload(f)) for f in folders]]
    scored = ds.map_batches(
        ScoreCandidates,
        fn_constructor_kwargs={
            "payload_refs": payload_refs,
            "out": out,
            "stride": stride,
            "device": actors.device,
            "threads": actors.threads(workers),
        },
        batch_size=images_per_shard,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **actors.options,
    )
    shards = []
    with progress(f"score {len(folders)} candidates on {split}", data.rows(split, max_images)) as bar:
        for row in scored.iter_rows():
            shards.append(
                Shard(uri=str(row["shard"]), first_id=str(row["first_id"]), images=int(row["images"]))
            )
            bar.advance(shards[-1].images)
    return sorted(shards, key=lambda s: s.first_id)
