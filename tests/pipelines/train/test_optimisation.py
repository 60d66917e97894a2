"""The optimiser step as the papers define it: a global batch however it is split, per-layer lr and decay
rules from the reference prototxts, frozen layers in eval mode, and schedules in iterations."""

from __future__ import annotations

import math
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch

import segmodels
from pipelines.config import CONFIG_DIR, TrainConfig, apply_overrides, load_train_config, read_yaml
from pipelines.errors import UserError
from pipelines.train.loop import (
    LrSchedule,
    build_optimizer,
    freeze,
    frozen_modules,
    lr_factor,
    train_one_epoch,
)
from pipelines.train.trainer import schedule_epochs

CLASSES = 5
WIDTH = 1 / 32
STEP = {"model": "deeplab_largefov", "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 1}


def step_batches(reduction: str) -> list[dict[str, torch.Tensor]]:
    """Eight 24x24 images and labels; with `sum` some pixels are void (255), with `mean` none are."""
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (8, 24, 24, 3), dtype=torch.uint8, generator=gen)
    masks = torch.randint(0, CLASSES, (8, 24, 24), dtype=torch.uint8, generator=gen)
    if reduction == "sum":
        masks[:3, :5] = 255  # uneven void: only the summed loss is the same for every split of the batch
    return [{"image": images[i : i + 1], "mask": masks[i : i + 1]} for i in range(8)]


def one_step(reduction: str, *, world: int = 1, rank: int = 0, iter_size: int = 1) -> dict[str, torch.Tensor]:
    """One optimiser step of the global batch of 8 through the real loop pieces; returns the new weights.

    Worker `rank` of `world` gets images [rank*8/world, (rank+1)*8/world), in micro-batches of
    8 / (world x iter_size); under torch.distributed the model is wrapped in DDP as Ray Train does.
    """
    values = apply_overrides(
        read_yaml(CONFIG_DIR / "deeplab_largefov_voc.yaml"),
        {**STEP, "loss_reduction": reduction, "batch_size": 8, "num_workers": world, "iter_size": iter_size},
    )
    cfg = TrainConfig(**values)
    torch.manual_seed(0)
    net = segmodels.build_model("deeplab_largefov", CLASSES, width=WIDTH)
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same forward on every split (dropout masks would differ)
    optimizer = build_optimizer(net, cfg)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    share = step_batches(reduction)[rank * 8 // world : (rank + 1) * 8 // world]
    micro = cfg.micro_batch_size
    batches = [
        {key: torch.cat([b[key] for b in share[i : i + micro]]) for key in ("image", "mask")}
        for i in range(0, len(share), micro)
    ]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, images, iteration = train_one_epoch(
        model, optimizer, scaler, batches, cfg, torch.device("cpu"), iteration=0, iters_per_epoch=1
    )
    assert (images, iteration) == (8 // world, 1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def ddp_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes, forked from the test (nothing to import again)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    weights = {reduction: one_step(reduction, world=2, rank=rank) for reduction in ("mean", "sum")}
    if rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_step_is_the_same_on_one_worker_two_workers_and_with_accumulation(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp.pt"
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=ddp_worker, args=(rank, port, str(out))) for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # inherited by both workers: two ranks on a small machine
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
    finally:
        torch.set_num_threads(threads)
    assert [proc.exitcode for proc in procs] == [0, 0]
    two_workers = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    before = segmodels.build_model("deeplab_largefov", CLASSES, width=WIDTH).state_dict()
    for reduction in ("mean", "sum"):
        whole = one_step(reduction)  # 1 worker x 8
        accumulated = one_step(reduction, iter_size=2)  # 1 worker x 4 x iter_size 2
        assert any(not torch.equal(whole[k], before[k]) for k in whole)  # the step moved the weights
        for key in whole:
            torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
            torch.testing.assert_close(two_workers[reduction][key], whole[key], rtol=1e-5, atol=1e-6, msg=key)


def groups_by_name(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight decay) of its optimiser group."""
    names = {id(p): name for name, p in net.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize(
    ("arch", "model_args", "expected"),
    [
        # DeepLab train.prototxt: every conv lr_mult 1/2 decay_mult 1/0, fc8 10/20.
        ("deeplab_largefov", {}, {"features.0": (1, 2, 1), "fc7.0": (1, 2, 1), "fc8": (10, 20, 1)}),
        # fyu/dilation network.py: every conv 1/2 and 1/0, the final layer and the context module at 1x.
        ("dilation", {"context": "basic"}, {"fc6.0": (1, 2, 1), "final": (1, 2, 1), "context.0": (1, 2, 1)}),
        # FCN voc-fcn8s prototxts: 1/2 and 1/0 on every conv, the score layers too.
        ("fcn8s", {}, {"features.0": (1, 2, 1), "score_fr": (1, 2, 1), "score_pool3": (1, 2, 1)}),
        # DeconvNet stage_1_train.prototxt: convs and deconvs 1/2 and 1/0.
        ("deconvnet", {}, {"features.0": (1, 2, 1), "score": (1, 2, 1)}),
    ],
)
def test_per_layer_lr_and_decay_follow_the_reference(arch, model_args, expected) -> None:
    cfg = load_train_config(CONFIG_DIR / f"{arch}_voc.yaml")
    net = segmodels.build_model(arch, CLASSES, width=WIDTH, **model_args)
    optimizer = build_optimizer(net, cfg)
    LrSchedule(cfg, iters_per_epoch=100).apply(optimizer, 0)  # the rates of the first step
    groups = groups_by_name(net, optimizer)
    for layer, (weight_mult, bias_mult, weight_decay_mult) in expected.items():
        assert groups[f"{layer}.weight"] == pytest.approx(
            (cfg.lr * weight_mult, cfg.weight_decay * weight_decay_mult)
        )
        assert groups[f"{layer}.bias"] == pytest.approx((cfg.lr * bias_mult, 0.0)), layer
    if arch == "deconvnet":
        # The BN layers give no lr_mult / decay_mult: Caffe's defaults 1 and 1.
        assert groups["features.1.weight"] == pytest.approx((cfg.lr, cfg.weight_decay))
        assert groups["features.1.bias"] == pytest.approx((cfg.lr, cfg.weight_decay))


def dropout_states(net: torch.nn.Module) -> dict[str, list[bool]]:
    """Records, per forward pass, whether each dropout layer was in training mode."""
    seen: dict[str, list[bool]] = {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(
                lambda m, i, o, name=name: seen.setdefault(name, []).append(m.training)
            )
    return seen


def train_once(net, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One step of `net` on two random 24x24 images; returns the weights before it."""
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    batch = {
        "image": torch.randint(0, 256, (2, 24, 24, 3), dtype=torch.uint8, generator=gen),
        "mask": torch.randint(0, CLASSES, (2, 24, 24), dtype=torch.uint8, generator=gen),
    }
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = build_optimizer(net, cfg)
    train_one_epoch(net, optimizer, scaler, [batch], cfg, torch.device("cpu"), iteration=0, iters_per_epoch=1)
    return before


def test_frozen_front_end_runs_in_eval_mode_while_the_context_module_trains() -> None:
    cfg = TrainConfig(model="dilation", lr=0.1, batch_size=2, freeze=("features", "fc6", "fc7", "final"))
    net = segmodels.build_model("dilation", CLASSES, width=WIDTH, context="basic")
    freeze(net, cfg.freeze)
    assert {id(m) for m in frozen_modules(net)} == {id(net.features), id(net.fc6), id(net.fc7), id(net.final)}
    seen = dropout_states(net)
    before = train_once(net, cfg)
    assert seen == {"fc6.2": [False], "fc7.2": [False]}  # dropout off in the frozen fc6/fc7
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("context.") for k in changed)
    # Unfrozen, the same layers train with dropout on.
    net = segmodels.build_model("dilation", CLASSES, width=WIDTH, context="basic")
    seen = dropout_states(net)
    train_once(net, cfg)
    assert seen == {"fc6.2": [True], "fc7.2": [True]}


def test_frozen_batch_norm_keeps_its_statistics() -> None:
    cfg = TrainConfig(model="deconvnet", lr=0.1, batch_size=2, train_only=("score",))
    net = segmodels.build_model("deconvnet", CLASSES, width=WIDTH)
    freeze(net, train_only=cfg.train_only)
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    train_once(net, cfg)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in stats.items())


def test_msc_stage_trains_only_the_new_branches() -> None:
    stages = {s["name"]: s for s in read_yaml(CONFIG_DIR / "reproduce" / "deeplab.yaml")["stages"]}
    train_only = tuple(stages["msc"]["set"]["train_only"])
    assert train_only == ("multiscale",)
    cfg = TrainConfig(model="deeplab_largefov", lr=0.1, batch_size=2, train_only=train_only)
    net = segmodels.build_model("deeplab_largefov", CLASSES, width=WIDTH, msc=True)
    frozen = freeze(net, train_only=cfg.train_only)
    assert frozen and not any(name.startswith("multiscale.") for name in frozen)
    trained = set(groups_by_name(net, build_optimizer(net, cfg)))
    assert trained == {k for k, _ in net.named_parameters() if k.startswith("multiscale.")}
    before = train_once(net, cfg)
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert changed and changed <= trained
    with pytest.raises(UserError, match="train_only: 'branches' names no parameter"):
        freeze(net, train_only=("branches",))


def test_batch_size_is_global_and_must_split_evenly() -> None:
    cfg = TrainConfig(batch_size=16, num_workers=2, iter_size=4)
    assert cfg.micro_batch_size == 2
    assert cfg.steps_per_epoch(100) == 6  # 50 rows per worker: 25 micro-batches of 2, 6 steps of 4
    with pytest.raises(UserError, match=r"batch_size=20 .* num_workers=3 x iter_size=1 .* use batch_size 21"):
        TrainConfig(batch_size=20, num_workers=3)
    with pytest.raises(UserError, match="freeze=.* and train_only=.* both given"):
        TrainConfig(freeze=("features",), train_only=("fc8",))


def test_max_iters_sets_the_epochs_and_the_poly_schedule() -> None:
    cfg = TrainConfig(max_iters=100, batch_size=8, lr_policy="poly")
    assert cfg.epochs is None and TrainConfig().epochs == 30
    assert schedule_epochs(cfg, 80) == 10  # 10 steps per epoch
    assert schedule_epochs(cfg, 72) == math.ceil(100 / 9)
    assert lr_factor(cfg, 50, 10) == pytest.approx(0.5**0.9)  # poly over max_iters, not over epochs
    assert lr_factor(TrainConfig(epochs=2, lr_policy="poly"), 5, 10) == pytest.approx(0.75**0.9)
    step = TrainConfig(max_iters=6000, lr_policy="step", step_iters=2000)
    assert [lr_factor(step, i, 7) for i in (1999, 2000, 4000)] == pytest.approx([1, 0.1, 0.01])
    assert schedule_epochs(TrainConfig(max_iters=100, epochs=10, batch_size=8), 80) == 10
    with pytest.raises(UserError, match="epochs=3 and max_iters=100 disagree: .* 10 epochs"):
        schedule_epochs(TrainConfig(max_iters=100, epochs=3, batch_size=8), 80)
    with pytest.raises(UserError, match="fewer than one step of batch_size 8"):
        schedule_epochs(cfg, 7)
    # A flag in one unit replaces the recipe's other one.
    assert apply_overrides({"max_iters": 6000}, {"epochs": 1}) == {"epochs": 1}
    assert apply_overrides({"epochs": 12}, {"max_iters": 5, "epochs": None}) == {"max_iters": 5}
