"""The command line: shared options declared once, configs built from the parsed options with their
defaults left to the config dataclasses."""

from __future__ import annotations

import re
from pathlib import Path

import pipelines.cli
from pipelines.cli import build_parser
from pipelines.cli.common import config_from_args
from pipelines.inference.predict import PredictConfig
from pipelines.select.ensemble.stage import EnsembleConfig

SHARED = ("--model-uri", "--data", "--tracking-uri", "--json-out")


def test_shared_options_are_declared_once():
    folder = Path(pipelines.cli.__file__).parent
    for module in folder.glob("*.py"):
        if module.name == "common.py":
            continue
        declared = re.findall(r'add_argument\(\s*"(--[a-z-]+)"', module.read_text())
        assert not set(declared) & set(SHARED), f"{module.name} declares {set(declared) & set(SHARED)}"


def test_configs_take_given_options_and_keep_their_defaults():
    parser = build_parser()
    args = parser.parse_args(
        ["predict", "--model-uri", "m", "--input", "in", "--out", "out", "--batch-size", "2"]
    )
    cfg = config_from_args(PredictConfig, args)
    assert (cfg.batch_size, cfg.format, cfg.max_pixels) == (2, "png", PredictConfig("m", "i", "o").max_pixels)
    args = parser.parse_args(["ensemble", "--candidates", "a", "b", "--data", "d", "--crf-grid", "small"])
    cfg = config_from_args(EnsembleConfig, args, candidates=tuple(args.candidates))
    assert (cfg.candidates, cfg.crf_grid, cfg.crf_images, cfg.stride) == (("a", "b"), "small", 100, 8)
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["ensemble"]._actions}
    assert "(default: 8)" in helps["stride"]  # the help quotes the config's default
