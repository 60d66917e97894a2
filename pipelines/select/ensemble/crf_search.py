"""Dense-CRF parameter search (DeepLab, ICLR 2015, section 4: bilateral kernel cross-validated on val).

A coarse grid over the bilateral kernel (w1, theta_alpha, theta_beta), then a finer stage one half-step
either side of the best point, each setting scored as Ray tasks over (setting, shard): one whole CPU each
(pydensecrf is single-threaded and holds the GIL) and the memory of the shard plus the dense CRF of its
largest image (`crf_task_memory`; 3.7 GB for a 2048x1024 image of 19 classes). The ensemble's
probabilities are rebuilt per image from the shard's selection grid (weighted with the chosen counts,
upsampled bilinearly to the image), so the comparison without CRF uses the very same maps.
The search spaces are `CRF_GRIDS` below, and nothing else: DeepLab's (the default) and a smaller one.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np

from pipelines.select.ensemble.scoring import Shard, image_probs, read_shard, unpack
from pipelines.select.ensemble.selection import confusion, miou


@dataclass(frozen=True)
class CRFGrid:
    """A first-round grid over the bilateral kernel and the finer stage's step (half the grid's spacing)."""

    coarse: dict[str, tuple[float, ...]]
    fine_step: dict[str, float]


CRF_GRIDS = {
    # DeepLab (ICLR 2015) sec. 4.1: w2 = 3 and sigma_gamma = 3 fixed, 10 mean-field iterations; the first
    # round searches w1 in [5, 10], sigma_alpha in [50:10:100] and sigma_beta in [3:6] (MATLAB ranges), then
    # "refine the search step sizes around the first round's best values" (the finer stage below): 48 + 6.
    "deeplab": CRFGrid(
        coarse={
            "w1": (5.0, 10.0),
            "theta_alpha": (50.0, 60.0, 70.0, 80.0, 90.0, 100.0),
            "theta_beta": (3.0, 4.0, 5.0, 6.0),
        },
        fine_step={"w1": 2.5, "theta_alpha": 5.0, "theta_beta": 0.5},
    ),
    # 12 + 6 settings around the values DeepLab-LargeFOV published for VOC (w1 4, sigma_alpha 121,
    # sigma_beta 5): a quarter of the paper's search, for retraining cycles and full-size images.
    "small": CRFGrid(
        coarse={"w1": (3.0, 5.0), "theta_alpha": (50.0, 80.0, 120.0), "theta_beta": (3.0, 5.0)},
        fine_step={"w1": 0.5, "theta_alpha": 10.0, "theta_beta": 1.0},
    ),
}


def crf_grid(name: str) -> CRFGrid:
    from pipelines.errors import UserError

    if name not in CRF_GRIDS:
        raise UserError(f"--crf-grid {name!r}: choose one of {', '.join(CRF_GRIDS)}")
    return CRF_GRIDS[name]


@dataclass(frozen=True)
class CRFSearch:
    """Best CRF setting (None when no setting beats the plain ensemble) and both scores, on `images`."""

    params: dict[str, float] | None
    miou_with: float
    miou_without: float
    images: int
    settings_tried: int


def crf_confusion(
    shard_uri: str, limit: int, weights: list[float], setting: dict[str, float] | None, num_classes: int
) -> np.ndarray:
    """C x C confusion of the ensemble on the first `limit` images of a shard, with CRF `setting` or none."""
    import torch
    import torch.nn.functional as F

    from pipelines.data.dataset import decode_mask
    from pipelines.images import decode_image
    from segmodels.crf import CRFParams, dense_crf
    from segmodels.ensemble import combine_probs

    shard = read_shard(shard_uri)
    total = np.zeros((num_classes, num_classes), np.int64)
    for index, probs in enumerate(image_probs(shard)[:limit]):
        image = decode_image(unpack(shard["image_bytes"], shard["image_offsets"], index))
        truth = decode_mask(unpack(shard["mask_bytes"], shard["mask_offsets"], index))
        grid = combine_probs(probs, weights)  # C,h,w
        full = F.interpolate(
            torch.from_numpy(grid)[None], size=truth.shape, mode="bilinear", align_corners=False
        )[0].numpy()
        if setting is not None:
            full = dense_crf(image, full, CRFParams(**setting))
        total += confusion(full.argmax(0), truth, num_classes)
    return total


def crf_task_memory(shard_uri: str, limit: int, num_classes: int) -> int:
    """Bytes a `crf_confusion` task on the first `limit` images of a shard reserves: the shard's arrays and
    their float32 grids, held throughout, plus the dense CRF of its largest image (`crf_memory_bytes`)."""
    from PIL import Image

    from segmodels.crf import crf_memory_bytes

    shard = read_shard(shard_uri)
    largest = 0
    for index in range(limit):
        with Image.open(io.BytesIO(unpack(shard["mask_bytes"], shard["mask_offsets"], index))) as mask:
            width, height = mask.size  # from the PNG header, nothing decoded
        largest = max(largest, crf_memory_bytes(height, width, num_classes))
    return sum(a.nbytes for a in shard.values()) + shard["probs"].size * 4 + largest


def coarse_settings(grid: str = "deeplab") -> list[dict[str, float]]:
    coarse = crf_grid(grid).coarse
    return [dict(zip(coarse, values, strict=True)) for values in itertools.product(*coarse.values())]


def fine_settings(
    best: dict[str, float], tried: list[dict[str, float]], grid: str = "deeplab"
) -> list[dict[str, float]]:
    """The best point moved half a grid step up or down along each parameter, if not tried already."""
    out = []
    for name, step in crf_grid(grid).fine_step.items():
        for sign in (-1, 1):
            setting = {**best, name: best[name] + sign * step}
            if setting[name] > 0 and setting not in tried and setting not in out:
                out.append(setting)
    return out


def search_crf(
    shards: list[Shard], weights: list[float], num_classes: int, max_images: int = 0, grid: str = "deeplab"
) -> CRFSearch:
    """Coarse grid + finer stage (`CRF_GRIDS[grid]`) on the first `max_images` images of the shards (0 = all).

    Raises UserError when a task would need more memory than the largest Ray node has (it would wait forever).
    """
    import ray

    from pipelines.errors import UserError
    from pipelines.progress import Progress, progress
    from pipelines.runtime import largest_node_memory

    task = ray.remote(num_cpus=1)(crf_confusion)
    plan, left = [], max_images or sum(s.images for s in shards)
    for shard in shards:
        if left <= 0:
            break
        plan.append((shard.uri, min(left, shard.images)))
        left -= shard.images
    measure = ray.remote(crf_task_memory)
    needs = ray.get([measure.remote(uri, limit, num_classes) for uri, limit in plan])
    available = largest_node_memory()
    if max(needs, default=0) > available:
        raise UserError(
            f"the CRF search needs {max(needs) / 2**30:.1f} GiB per task (a shard's maps and the dense CRF of "
            f"its largest image), more than the {available / 2**30:.1f} GiB of Ray memory on the largest node: "
            "run it where a node has more memory, or leave out --crf"
        )

    images = sum(limit for _, limit in plan)

    def score(settings: list[dict[str, float] | None], bar: Progress) -> list[float]:
        """mIoU per setting; the tasks' images count on `bar` as each task finishes."""
        refs = [
            [
                task.options(memory=need).remote(uri, limit, weights, s, num_classes)
                for (uri, limit), need in zip(plan, needs, strict=True)
            ]
            for s in settings
        ]
        images_of = {ref: limit for row in refs for ref, (_, limit) in zip(row, plan, strict=True)}
        pending = list(images_of)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.advance(images_of[done[0]])
        return [miou(sum(ray.get(r))) for r in refs]

    coarse = coarse_settings(grid)
    with progress(f"CRF search, {len(coarse) + 1} settings", images * (len(coarse) + 1)) as bar:
        without, *scores = score([None, *coarse], bar)
    tried = list(coarse)
    best_index = int(np.argmax(scores))
    fine = fine_settings(coarse[best_index], tried, grid)
    tried += fine
    with progress(f"CRF search, {len(fine)} finer settings", images * len(fine)) as bar:
        scores += score(fine, bar)
    best_index = int(np.argmax(scores))
    best = {**tried[best_index], "iterations": 10, "w2": 3.0, "theta_gamma": 3.0}
    if scores[best_index] <= without:
        return CRFSearch(None, scores[best_index], without, images, len(tried))
    return CRFSearch(best, scores[best_index], without, images, len(tried))
