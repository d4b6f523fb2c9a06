"""``posttrain`` command line: subcommand → function. Parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from posttrain.config import STAGE_CONFIGS, ConfigError, describe_fields, load_config
from posttrain.data.records import KINDS


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        if args.help_config not in STAGE_CONFIGS:
            raise ConfigError(f"--help-config: unknown stage {args.help_config!r}; stages: {', '.join(STAGE_CONFIGS)}")
        for key, type_name, default, help_text in describe_fields(STAGE_CONFIGS[args.help_config]):
            print(f"{key}\n    {help_text}\n    type: {type_name}   default: {default}")
        return 0
    if not args.config:
        raise ConfigError("posttrain train needs a CONFIG.yaml (or --help-config STAGE)")
    config = load_config(args.config, args.overrides)
    from posttrain.recipes import RECIPES

    RECIPES[config.stage](config, args.config)
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from posttrain.demo.toy import build_toy

    paths = build_toy(args.dir, size=args.size, seed=args.seed)
    print(f"toy model: {paths.model}")
    for name in ("sft", "prefs", "prompts", "eval", "pretrain"):
        print(f"{name + ':':9} {getattr(paths, name)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from posttrain.models.export import export_run

    out = export_run(args.run_dir, args.out, merge=args.merge)
    print(f"exported: {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from posttrain.eval.reward_model import score_file

    summary = score_file(args.model, args.data, args.out, batch_size=args.batch_size)
    line = f"{summary['records']} {summary['kind']} records: mean reward {summary['mean_reward']:.4f} (std {summary['std_reward']:.4f})"
    if "accuracy" in summary:
        line += f", accuracy {summary['accuracy']:.4f} (chosen > rejected), mean gap {summary['mean_gap']:.4f}"
    print(line)
    if args.out:
        print(f"scores: {summary['out']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from posttrain.demo.run import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import json

    from posttrain.data.quality import format_report, inspect_dataset

    report = inspect_dataset(args.source, registry=args.registry, kind=args.kind, tokenizer=args.tokenizer, max_length=args.max_length)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from posttrain.data.preflight import load_for_check, preflight
    from posttrain.models import load_tokenizer

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    sequences = load_for_check(config, tokenizer)
    for line in sequences.reports:
        print(f"data: {line}")
    report = preflight(sequences, tokenizer, config.data, config.stage)
    print(report.text())
    return 2 if report.problems else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for large language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run one stage from a YAML config with key.sub=value overrides")
    train.add_argument("config", nargs="?", help="stage config YAML (configs/*.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 model.path=DIR")
    train.add_argument("--help-config", metavar="STAGE", help="list every field of STAGE's config with help and default")
    train.set_defaults(func=cmd_train)

    toy = commands.add_parser("toy", help="write a tiny model, tokenizer and synthetic datasets (offline, seconds)")
    toy.add_argument("dir")
    toy.add_argument("--size", default="tiny", choices=["tiny", "small"])
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=cmd_toy)

    export = commands.add_parser("export", help="write a run's model as a plain Hugging Face directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--merge", action="store_true", help="merge LoRA/DoRA weights into the base model")
    export.set_defaults(func=cmd_export)

    score = commands.add_parser("score", help="score conversations or preference pairs with a trained reward model")
    score.add_argument("model", metavar="RM_DIR", help="a stage: reward run directory (or its model/ folder)")
    score.add_argument("data", help="a data file: preference pairs (accuracy is reported) or conversations")
    score.add_argument("--out", metavar="FILE", help="write one JSON row per record with its score(s)")
    score.add_argument("--batch-size", type=_positive_int, default=32)
    score.set_defaults(func=cmd_score)

    demo = commands.add_parser("demo", help="the embedded default: toy model and data, then training end to end")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a shorter run (for tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    data = commands.add_parser("data", help="look at a dataset before training on it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_inspect = data_commands.add_parser(
        "inspect",
        help="report format, invalid rows, token lengths, duplicates, turns and label balance of a dataset",
        description="Read a data file, folder or LLaMA-Factory dataset name (invalid rows are listed, not fatal) "
        "and report what a training run would see.",
    )
    data_inspect.add_argument("source", metavar="PATH|NAME", help="a data file or folder, hf:org/name, or a dataset_info.json name")
    data_inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    data_inspect.add_argument("--tokenizer", metavar="DIR", help="count tokens with this local tokenizer and its chat template (default: an offline approximation)")
    data_inspect.add_argument("--max-length", type=_positive_int, default=1024, metavar="N", help="report the share of samples longer than N tokens (default 1024)")
    data_inspect.add_argument("--registry", metavar="FILE", help="dataset_info.json (or its folder) to look NAME up in; default ./ or ./data")
    data_inspect.add_argument("--kind", choices=KINDS, help="read the records as this kind (default: inferred from the first row)")
    data_inspect.set_defaults(func=cmd_data_inspect)

    data_check = data_commands.add_parser("check", help="the preflight of a training config, without training")
    data_check.add_argument("config", help="stage config YAML")
    data_check.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    data_check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.data.errors import DataError
    from posttrain.models.loading import ModelLoadError
    from posttrain.runtime import NonFiniteLossError, TrainingInterrupted

    args = build_parser().parse_args(argv)
    handlers: dict[type[BaseException], Callable[[BaseException], int]] = {
        ConfigError: lambda e: _fail(str(e), 2),
        DataError: lambda e: _fail(f"data error: {e}", 2),
        ModelLoadError: lambda e: _fail(str(e), 2),
        FileNotFoundError: lambda e: _fail(str(e), 2),
        NonFiniteLossError: lambda e: _fail(str(e), 1),
    }
    try:
        return args.func(args)
    except BrokenPipeError:  # `posttrain data inspect ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except TrainingInterrupted as interrupted:
        print(interrupted.message, file=sys.stderr)
        return int(interrupted.code)  # type: ignore[arg-type]
    except tuple(handlers) as error:  # type: ignore[misc]
        return next(h for t, h in handlers.items() if isinstance(error, t))(error)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
