"""The ``vargpt`` command line: a thin table over typed library functions (no logic here).

Every subcommand imports its implementation lazily, so ``vargpt --help`` is fast and a command only
pays for the libraries it uses. Library errors with a clear message (``ConfigError``,
``DatasetError``, ``CheckpointError`` ...) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], Any]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------------------------------
# Handlers (each: import the library function, call it, print its result)
# --------------------------------------------------------------------------------------------------


def _data_shapesworld(a: argparse.Namespace) -> None:
    from vargpt.data.shapesworld import write_dataset

    _print_json(write_dataset(a.out, n_train=a.n_train, n_test=a.n_test, seed=a.seed,
                              image_size=a.image_size, progress=not a.quiet, layout_classes=not a.plain_classes))


def _data_validate(a: argparse.Namespace) -> None:
    from vargpt.data.records import load_records

    counts = {split: len(load_records(a.data, split)) for split in a.splits}
    _print_json({"ok": True, "records": counts})


def _config_show(a: argparse.Namespace) -> None:
    from vargpt.config import VARGPTConfig

    print(VARGPTConfig.from_name(a.preset).to_json(), end="")


def _step_overrides(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``["decoder.max_steps=500", ...]`` -> ``{"decoder": {"max_steps": 500}}`` (values read as JSON, else text)."""
    import json

    from vargpt.config import ConfigError

    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        step, dot, name = key.partition(".")
        if not (sep and dot and step and name):
            raise ConfigError(f"--set {pair!r}: write STEP.ARGUMENT=VALUE, e.g. --set decoder.max_steps=500")
        try:
            value: object = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(step, {})[name] = value
    return out


def _recipe(a: argparse.Namespace) -> None:
    from vargpt.recipe import run_recipe

    _print_json(run_recipe(out_dir=a.out, preset=a.preset, data_dir=a.data, seed=a.seed,
                           progress=not a.quiet, smoke=a.smoke, workers=a.workers,
                           step_overrides=_step_overrides(a.set)))


def _ablate(a: argparse.Namespace) -> None:
    from vargpt.ablation import run_ablation

    result = run_ablation(out_dir=a.out, preset=a.preset, data_dir=a.data, from_run=a.from_run,
                          max_steps=a.max_steps, seed=a.seed, max_understanding=a.max_understanding,
                          max_generation=a.max_generation, progress=not a.quiet)
    print(result["table"])
    print(f"written: {Path(a.out) / 'ablation.json'}")
    print(f"reproduce: {result['command']}")


def _train(a: argparse.Namespace) -> None:
    what, common = a.what, {"preset": a.preset, "progress": not a.quiet}
    if what == "tokenizer":
        from vargpt.training.tokenizer_trainer import train_tokenizer

        result = train_tokenizer(data_dir=a.data, out_dir=a.out, max_steps=a.steps, resume=a.resume, seed=a.seed,
                                 finetune_steps=a.finetune_steps, init_from=a.from_dir, adv_weight=a.adv_weight,
                                 adv_start=a.adv_start, perceptual_weight=a.perceptual_weight,
                                 perceptual_model=a.perceptual_model, **common)
    elif what == "decoder":
        from vargpt.training.decoder_trainer import train_decoder

        result = train_decoder(data_dir=a.data, tokenizer_dir=_need(a, "tokenizer"), out_dir=a.out,
                               max_steps=a.steps, resume=a.resume, seed=a.seed, **common)
    elif what == "base":
        from vargpt.training.base_models import train_base_models

        result = train_base_models(a.data, a.out, preset=a.preset, progress=not a.quiet)
    elif what == "assemble":
        from vargpt.training.assemble import assemble_vargpt

        result = assemble_vargpt(llava_dir=_need(a, "llava"), vqvae_dir=_need(a, "tokenizer"),
                                 decoder_dir=_need(a, "decoder"), out_dir=a.out, preset=a.preset, seed=a.seed)
    else:
        from vargpt.training.vargpt_trainer import train_stage

        result = train_stage(what, from_dir=_need(a, "from_dir"), data_dir=a.data, out_dir=a.out,
                             max_steps=a.steps, resume=a.resume, seed=a.seed, **common)
    _print_json(result)


def _need(a: argparse.Namespace, name: str) -> Path:
    value = getattr(a, name)
    if value is None:
        from vargpt.config import ConfigError

        raise ConfigError(f"vargpt train {a.what} needs --{name.replace('_dir', '').replace('_', '-')} DIR")
    return value


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vargpt`` console script."""
    p = argparse.ArgumentParser(prog="vargpt", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # vargpt data ...
    data = sub.add_parser("data", help="build or validate datasets").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    s = data.add_parser("shapesworld", help="write the procedural ShapesWorld dataset")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--n-train", type=int, default=4000, help="training images")
    s.add_argument("--n-test", type=int, default=400, help="held-out images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--plain-classes", action="store_true",
                   help="generation records get the class '{colour} {shape}' instead of "
                        "'{size} {colour} {shape} {position}'")
    s.set_defaults(func=_data_shapesworld)
    s = data.add_parser("validate", help="check a dataset folder in the README format")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--splits", nargs="+", default=["train", "test"])
    s.set_defaults(func=_data_validate)

    # vargpt train ...
    s = sub.add_parser("train", help="train one piece: tokenizer, decoder, base models, or a VARGPT stage")
    s.add_argument("what", choices=["tokenizer", "decoder", "base", "assemble", "stage1", "stage2", "stage3"],
                   help="tokenizer: VQ-VAE; decoder: class-conditional VAR; base: tiny LLaVA (text tokenizer, "
                        "LLM, vision tower, alignment, instruction tuning); assemble: VARGPT from its parts; "
                        "stageN: VARGPT stage N")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--data", type=Path, help="dataset folder (README format)")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--from", dest="from_dir", type=Path,
                   help="stageN: model to start from (previous stage); tokenizer: a trained tokenizer to go on from "
                        "in --out (e.g. its decoder finetuning, after a run with --finetune-steps 0)")
    s.add_argument("--tokenizer", type=Path, help="decoder/assemble: trained VQ-VAE folder")
    s.add_argument("--decoder", type=Path, help="assemble: trained visual decoder folder")
    s.add_argument("--llava", type=Path, help="assemble: trained base LLaVA folder (base/llava)")
    s.add_argument("--steps", type=int, default=None, help="override the recipe's optimiser steps")
    s.add_argument("--finetune-steps", type=int, default=None,
                   help="tokenizer: decoder finetuning steps after the main phase (default: the recipe's; 0 = none)")
    s.add_argument("--adv-weight", type=float, default=None,
                   help="tokenizer: weight of the adversarial (VQGAN patch-discriminator) term of the main phase "
                        "(default: the recipe's, 0 = off)")
    s.add_argument("--adv-start", type=int, default=None,
                   help="tokenizer: main-phase step from which the adversarial term counts (default: the recipe's)")
    s.add_argument("--perceptual-weight", type=float, default=None,
                   help="tokenizer: weight of a perceptual distance on a local vision model's features (default: the "
                        "recipe's, 0 = off); needs --perceptual-model")
    s.add_argument("--perceptual-model", type=Path, default=None,
                   help="tokenizer: local folder of a transformers vision model (ResNet, ConvNeXt, DINOv2, CLIP, ...) "
                        "for the perceptual distance; nothing is downloaded")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_train)

    # vargpt config
    s = sub.add_parser("config", help="print a preset's full configuration as JSON")
    s.add_argument("--preset", default="tiny")
    s.set_defaults(func=_config_show)

    # vargpt pipeline
    s = sub.add_parser("pipeline", help="run the whole recipe: data, tokenizer, base models, stages, eval")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--out", type=Path, required=True, help="run folder (finished steps are skipped on rerun)")
    s.add_argument("--data", type=Path, default=None, help="dataset folder (default: generate ShapesWorld)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--smoke", action="store_true",
                   help="check that your data goes through every step: a few optimiser steps per step and a few "
                        "eval samples, well under a minute on small data (numbers mean nothing; use its own --out)")
    s.add_argument("--workers", type=int, default=None,
                   help="independent steps run side by side in this many processes, splitting the CPU threads "
                        "(default: 2 on a CPU with >= 2 threads, 1 with CUDA; 1 = one step at a time)")
    s.add_argument("--set", action="append", default=[], metavar="STEP.ARG=VALUE",
                   help="override a step's training argument, e.g. --set decoder.max_steps=500 "
                        "--set tokenizer_finetune.finetune_steps=1200 (repeatable; applies to steps not yet done)")
    s.set_defaults(func=_recipe)

    # vargpt ablate
    s = sub.add_parser("ablate", help="stage ablation (paper Table 4 pattern): train and evaluate variants",
                       description="Variants full / w/o stage 1 / w/o stage 3 / stage 3 with frozen generation "
                                   "projectors / with frozen visual decoder, from the recipe's stage0; shared "
                                   "stage prefixes train once (vargpt.ablation).")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--out", type=Path, required=True, help="ablation folder (finished variants are skipped)")
    s.add_argument("--data", type=Path, default=None, help="dataset folder (default: the run's data/)")
    s.add_argument("--from-run", type=Path, default=None,
                   help="reuse this `vargpt pipeline` run folder's steps up to assemble (default: run them in OUT/run)")
    s.add_argument("--max-steps", type=int, default=None, help="optimiser steps of every stage (default: recipe's)")
    s.add_argument("--max-understanding", type=int, default=500, help="questions evaluated per variant")
    s.add_argument("--max-generation", type=int, default=64, help="generation prompts evaluated per variant")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_ablate)

    # vargpt chat / generate / eval / feature-net (parser builders live next to their implementations)
    from vargpt.evaluation.run import add_eval_parser, add_feature_net_parser
    from vargpt.generation.cli_commands import add_chat_parser, add_generate_parser

    add_chat_parser(sub)
    add_generate_parser(sub)

    add_eval_parser(sub)
    add_feature_net_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vargpt`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from vargpt.errors import USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
