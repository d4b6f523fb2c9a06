"""``posttrain`` command line: subcommand → function. Parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import STAGE_CONFIGS, ConfigError, StageConfig, describe_fields, load_config
from posttrain.data.records import KINDS
from posttrain.launch.local import Launch, LaunchError, launch

if TYPE_CHECKING:
    from posttrain.pipeline import Pipeline

# The shipped configs (package data, so an installed wheel has them too): one per stage variant, and demo.yaml,
# the pipeline `posttrain demo` runs. In a checkout, ./configs points here.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_PIPELINE = SHIPPED_CONFIGS / "demo.yaml"
LOOP_DEMO_PIPELINE = SHIPPED_CONFIGS / "loop_demo.yaml"


def stage_config(
    stage_or_file: str, overrides: list[str], without_data: bool = False
) -> tuple[StageConfig, str | None]:
    """The config a ``train``/``data check`` command names: a stage name (``sft``, ``dpo``, ...) starts from that
    stage's defaults, as ``trl sft`` does; anything else is a YAML file. Returns the config and its file (None
    for a stage name)."""
    if stage_or_file in STAGE_CONFIGS and not Path(stage_or_file).is_file():
        return load_config(None, [f"stage={stage_or_file}", *overrides], without_data), None
    if not Path(stage_or_file).is_file():
        raise ConfigError(
            f"{stage_or_file}: no such config file, and not a stage name; give a YAML file (e.g. "
            f"{SHIPPED_CONFIGS / 'sft_lora.yaml'}) or a stage: {', '.join(STAGE_CONFIGS)}"
        )
    return load_config(stage_or_file, overrides, without_data), stage_or_file


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        if args.help_config not in STAGE_CONFIGS:
            raise ConfigError(f"--help-config: unknown stage {args.help_config!r}; stages: {', '.join(STAGE_CONFIGS)}")
        for key, type_name, default, help_text in describe_fields(STAGE_CONFIGS[args.help_config]):
            print(f"{key}\n    {help_text}\n    type: {type_name}   default: {default}")
        return 0
    if not args.config:
        raise ConfigError(
            f"posttrain train needs a stage ({', '.join(STAGE_CONFIGS)}) or a CONFIG.yaml (or --help-config STAGE)"
        )
    config, config_file = stage_config(args.config, args.overrides)
    check_model_path(config.model.path)
    spec = Launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if spec.needed or spec.nnodes > 1:
        # Checked once here (one error line, exit 2), then every process reads the same config and overrides.
        return launch(spec, [args.config, *args.overrides])
    from posttrain.recipes import RECIPES

    RECIPES[config.stage](config, config_file)
    _end_launched_process()
    return 0


def _end_launched_process() -> None:
    """A launched process's run is over and saved: leave the process group together, then end the process here,
    not in the interpreter's shutdown. The engines keep the group alive past ``destroy_process_group`` (DTensor's
    sharding caches hold FSDP2's device mesh and its group; DeepSpeed keeps a module-level world group and one on
    every ZeRO-3 parameter), so its gloo/NCCL threads still run while Python tears its modules down, and under load
    that teardown aborted finished jobs ("terminate called without an active exception", exit -6, after "done").
    The exit handlers still run and the output is flushed; only that teardown is skipped. A one-process run keeps
    its group of one (see runtime.distributed.ensure_process_group)."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # every process has saved what it writes before any leaves
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # what a normal exit runs first: logging's flush, multiprocessing's joins, trackers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# A hub id: "name" or "org/name" of letters, digits, "-", "_" and "." (huggingface_hub's rule), not a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MODEL_FILES = ("config.json", "adapter_config.json")


def check_model_path(path: str) -> None:
    """Refuse, in one line (``ModelLoadError``, exit 2), a ``model.path`` that names no model: a missing or
    mistyped directory, a directory without ``config.json``, or a hub id that is neither in the local cache nor
    (online) on the hub. Before any data or weights are read, so the user never sees a hub traceback."""
    from posttrain.models.loading import ModelLoadError, model_dir_of

    local = Path(path).expanduser()
    expected = "expected a Hugging Face model directory (with config.json, e.g. a run's OUTPUT_DIR/model) or a hub id such as Qwen/Qwen2.5-0.5B"
    if local.is_dir():
        try:  # the resolver every loader uses: the directory itself, or a run directory's model/ folder
            model_dir_of(local)
        except FileNotFoundError:
            raise ModelLoadError(
                f"model.path={path}: the directory has no config.json or adapter_config.json; {expected}"
            ) from None
        return
    if local.exists():
        raise ModelLoadError(f"model.path={path}: a file, not a model directory; {expected}")
    if path.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(path):
        raise ModelLoadError(f"model.path={path}: no such directory; {expected}")
    _check_hub_id(path, expected)


def _check_hub_id(repo_id: str, expected: str) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from posttrain.models.loading import ModelLoadError

    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in _MODEL_FILES):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model.path={repo_id}: no such local directory, and this hub id is not in the Hugging Face cache "
            f"(HF_HUB_OFFLINE is set, so nothing is downloaded); {expected}"
        )
    try:  # one request, no retries: a machine without network answers in seconds, not after a minute of backoff
        HfApi().model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ModelLoadError(
            f"model.path={repo_id}: a gated model on the hub; accept its terms and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model.path={repo_id}: no such local directory, and no such model on the Hugging Face hub (or it is "
            f"private: log in with hf auth login); {expected}"
        ) from None
    except Exception as error:  # no network, a proxy, a timeout: whatever the HTTP stack raises
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelLoadError(
            f"model.path={repo_id}: no such local directory, and the Hugging Face hub could not be reached ({reason}); "
            f"{expected}, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from None


def cmd_toy(args: argparse.Namespace) -> int:
    from posttrain.toy import build_toy

    paths = build_toy(args.dir, size=args.size, seed=args.seed)
    print(f"toy model: {paths.model}")
    for name in ("sft", "prefs", "prompts", "eval", "eval_prefs", "eval_mc", "pretrain"):
        print(f"{name + ':':11} {getattr(paths, name)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from posttrain.models.export import export_run

    if args.checkpoint:
        from posttrain.runtime.export import export_checkpoint

        if args.merge:
            raise ConfigError(
                "export --checkpoint writes what the run's model/ would hold (an adapter run: the adapter); export "
                "that directory again with --merge"
            )
        out = export_checkpoint(args.run_dir, args.checkpoint, args.out)
        print(f"exported: {out}")
        return 0
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


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from posttrain.eval import EvalError, evaluate_files, format_report

    try:
        report = evaluate_files(
            args.models,
            args.data,
            reward_model=args.reward_model,
            reference=args.reference,
            judge=args.judge,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except EvalError as error:
        raise ConfigError(f"posttrain eval: {error}") from None
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"results: {out}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from posttrain.pipeline import load_pipeline

    shipped = SHIPPED_CONFIGS / f"{args.config}.yaml"
    path = shipped if not Path(args.config).exists() and shipped.is_file() else Path(args.config)
    pipeline = load_pipeline(path, args.overrides, quick=args.quick)
    if args.dry_run:
        for name in pipeline.order:
            inputs = ", ".join(pipeline.stages[name].inputs) or "-"
            print(f"{name:24} after: {inputs}")
        return 0
    _run_and_summarise(pipeline, from_stage=args.from_stage)
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from posttrain.loop import LOOP_JSON, load_loop_config, run_loop
    from posttrain.pipeline import load_pipeline, run_pipeline

    if args.config == "demo" and not Path(args.config).exists():
        out = Path(args.out or "runs/loop_demo")
        overrides = [f"out={out}", f"seed={args.seed if args.seed is not None else 0}", *args.overrides]
        pipeline = load_pipeline(LOOP_DEMO_PIPELINE, overrides, quick=args.quick)
        started = time.time()
        run_pipeline(pipeline)
        shutil.copyfile(out / "loop" / LOOP_JSON, out / LOOP_JSON)
        from posttrain.loop import format_rounds

        report = json.loads((out / LOOP_JSON).read_text(encoding="utf-8"))
        print(format_rounds(report))
        print(f"finished in {time.time() - started:.0f} s; rounds in {out / LOOP_JSON}")
        return 0
    for name in ("out", "seed"):
        if getattr(args, name) is not None:
            raise ConfigError(f"--{name} is for `posttrain loop demo`; in a loop config set {name}: in the file")
    if args.quick:
        raise ConfigError("--quick is for `posttrain loop demo`")
    from posttrain.loop import format_rounds

    print(format_rounds(run_loop(load_loop_config(args.config, args.overrides))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo is the shipped pipeline ``demo.yaml`` (toy kit → pretrain → SFT → reward model → PPO, GRPO, DPO,
    rejection sampling, each evaluated on the same held-out prompts) with this seed and output directory."""
    from posttrain.pipeline import load_pipeline

    pipeline = load_pipeline(DEMO_PIPELINE, [f"out={args.out}", f"seed={args.seed}"], quick=args.quick)
    _run_and_summarise(pipeline)
    return 0


def _run_and_summarise(pipeline: Pipeline, from_stage: str | None = None) -> None:
    """Run the pipeline, then print its evaluation table, what ran and where the report is."""
    from posttrain.eval.report import format_table
    from posttrain.pipeline import run_pipeline

    started = time.time()
    result = run_pipeline(pipeline, from_stage=from_stage)
    if result.evaluation:
        print(f"\n{format_table(result.evaluation, pipeline.reference_row())}\n")
    print(f"finished in {time.time() - started:.0f} s ({len(result.ran)} stages run, {len(result.reused)} reused)")
    print(f"  ran: {', '.join(result.ran) or '-'}; reused: {', '.join(result.reused) or '-'}")
    if result.evaluation:
        out = pipeline.out
        print(
            f"  report: {out / 'report.html'}\n  also:   {out / 'report.md'}, {out / 'eval.json'}, one run directory per stage in {out}/"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from posttrain.serve.server import build_server, serve

    adapters: dict[str, str] = {}
    for spec in args.adapter or []:
        name, separator, path = spec.partition("=")
        if not separator or not name or not path:
            raise ConfigError(f"--adapter {spec}: expected NAME=PATH (an adapter directory or a LoRA run directory)")
        if name in adapters:
            raise ConfigError(f"--adapter {name} is given twice")
        adapters[name] = path
    parts = build_server(
        args.base,
        adapters,
        args.adapter_dir or [],
        api_key=args.api_key,
        max_loaded=args.max_loaded,
        max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(parts, args.host, args.port, lambda line: print(line, file=sys.stderr, flush=True))


def cmd_chat(args: argparse.Namespace) -> int:
    from posttrain.serve.chat import run_chat

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(
            f"--temperature must be >= 0 (got {args.temperature}) and --top-p in (0, 1] (got {args.top_p})"
        )
    return run_chat(
        args.models,
        prompts=args.prompt,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        template=args.template,
        dtype=args.dtype,
        columns=args.columns,
    )


def cmd_label_create(args: argparse.Namespace) -> int:
    from posttrain.feedback.create import items_from_models, items_from_pairs
    from posttrain.feedback.store import LabelError, LabelStore

    if not (args.pairs or args.prompts or args.gold):
        raise ConfigError("label create: give --pairs FILE, or --prompts FILE --models A B ..., and/or --gold FILE")
    if bool(args.prompts) != bool(args.models):
        raise ConfigError("label create: --prompts and --models go together (prompts to sample the models on)")
    try:
        items = items_from_pairs(args.pairs, battle=args.battle) if args.pairs else []
        if args.prompts:
            for path in args.models:
                check_model_path(path)
            items += items_from_models(
                args.prompts,
                args.models,
                battle=args.battle,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                template=args.template,
            )
        gold = items_from_pairs(args.gold, battle=args.battle, gold_required=True) if args.gold else []
        with LabelStore(args.db) as store:
            ids = store.add_items(items + gold)
            progress = store.progress()
    except LabelError as error:
        return _fail(f"{args.db}: {error}", 2)
    print(
        f"{args.db}: {len(ids)} items given ({len(gold)} gold); the store now holds {progress['items']} items and "
        f"{progress['gold_items']} gold items"
    )
    return 0


def cmd_label_serve(args: argparse.Namespace) -> int:
    from posttrain.feedback.app import serve as serve_labels
    from posttrain.feedback.create import items_from_pairs
    from posttrain.feedback.store import LabelError, LabelStore

    _existing_label_db(args.db)
    try:
        annotators: list[str] | dict[str, str] = (
            _label_tokens(args.tokens)
            if args.tokens
            else [name for names in args.annotators for name in names.split(",") if name]
        )
        store = LabelStore(args.db)
        store.configure(overlap=args.overlap, gold_rate=args.gold_rate)
        if args.gold:  # the same rows as `create --gold`; an item already stored is kept as it is
            store.add_items(items_from_pairs(args.gold, gold_required=True))
        if not store.progress()["items"]:
            return _fail(f"{args.db}: no items to label; add some with `posttrain label create`", 2)
        tokens = store.add_annotators(annotators)
    except LabelError as error:
        return _fail(f"{args.db}: {error}", 2)
    for name, token in tokens.items():
        print(f"{name}: http://{args.host}:{args.port}/?token={token}", flush=True)
    return serve_labels(store, args.host, args.port, lambda line: print(line, file=sys.stderr, flush=True))


def _label_tokens(path: str) -> dict[str, str]:
    """``--tokens FILE``: one ``NAME TOKEN`` per line; blank lines and ``#`` comments are skipped."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] in tokens:
            raise ConfigError(f"{path}:{number}: expected one 'NAME TOKEN' per line, each name once")
        tokens[fields[0]] = fields[1]
    if not tokens:
        raise ConfigError(f"{path}: no 'NAME TOKEN' lines")
    return tokens


def _existing_label_db(path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such label database; make it with `posttrain label create {path} --pairs FILE`")


def cmd_label_export(args: argparse.Namespace) -> int:
    import json

    from posttrain.feedback.store import LabelError, LabelStore

    _existing_label_db(args.db)
    try:
        margins = [float(part) for part in args.margins.split(",")]
    except ValueError:
        raise ConfigError(f"--margins {args.margins}: expected 4 numbers, e.g. 3,2,1,0") from None
    try:
        with LabelStore(args.db) as store:
            rows, left_out = store.aggregate(margins)
            progress = store.progress()
    except LabelError as error:
        return _fail(f"--margins: {error}", 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(
        f"{out}: {len(rows)} preference rows; left out: {left_out['ties']} even splits, {left_out['no_votes']} "
        f"items without a vote, {left_out['gold']} gold items"
    )
    if not progress["complete"]:
        print(
            f"note: labelling is not complete ({progress['answers_given']}/{progress['answers_needed']} answers)",
            file=sys.stderr,
        )
    return 0


def cmd_label_report(args: argparse.Namespace) -> int:
    import json

    from posttrain.feedback.report import format_report, label_report
    from posttrain.feedback.store import LabelStore

    _existing_label_db(args.db)
    with LabelStore(args.db) as store:
        report = label_report(store, args.min_gold_accuracy, args.bootstrap_rounds, args.seed)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    import json

    from posttrain.data.quality import format_report, inspect_dataset

    report = inspect_dataset(
        args.source, registry=args.registry, kind=args.kind, tokenizer=args.tokenizer, max_length=args.max_length
    )
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_report(report))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from posttrain.data.preflight import load_for_check, preflight
    from posttrain.models import load_tokenizer

    config, _ = stage_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.model)
    sequences = load_for_check(config, tokenizer)
    for line in sequences.reports:
        print(f"data: {line}")
    report = preflight(sequences, tokenizer, config.data, config.stage)
    print(report.text())
    return 2 if report.problems else 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from posttrain.estimate import advice_json, advise, plan_json, plan_memory, render_advice

    # A plan reads no data; --probe and --time run the stage, which does.
    config, _ = stage_config(args.config, args.overrides, without_data=not (args.probe or args.time))
    plan = plan_memory(config, args.gpus)
    advice = advise(config, args.gpus, args.gpu_mem) if args.gpu_mem is not None else None
    measured: dict[str, Any] = {}
    for flag, value, needs in (
        ("--probe-layers", args.probe_layers, args.probe),
        ("--sample", args.sample, args.time),
        ("--peak-tflops", args.peak_tflops, args.time),
    ):
        if value is not None and not needs:
            raise ConfigError(f"{flag} applies to {'--probe' if flag == '--probe-layers' else '--time'}, not given")
    if args.probe or args.time:
        from posttrain import probe

        check_model_path(config.model.path)
        if args.probe:
            memory = probe.probe_memory(config, layers=args.probe_layers)
            measured["probe"] = (probe.probe_json(memory), probe.render_probe(memory))
        if args.time:
            peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
            timing = probe.time_run(config, sample=args.sample or 0.01)
            measured["time"] = (probe.time_json(timing, peak_flops), probe.render_time(timing, peak_flops))
    if args.json:
        extra = {name: data for name, (data, _) in measured.items()}
        print(json.dumps({**plan_json(plan), **({"advice": advice_json(advice)} if advice else {}), **extra}))
    else:
        print(plan.render(explain=args.explain))
        if advice:
            print(render_advice(advice))
        for _, text in measured.values():
            print(text)
    return 0


def cmd_launch_k8s(args: argparse.Namespace) -> int:
    from posttrain.launch.k8s import Cluster, launch_k8s

    cluster = Cluster(
        args.nodes, args.gpus_per_node, args.image or "", args.storage, args.storage_class, args.ttl_after_finished
    )
    config, _ = stage_config(args.config, args.overrides)
    print(launch_k8s(config, args.kind, cluster, name=args.name, out=args.out), end="")
    return 0


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
    # The deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK in the environment says the same).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="run one stage from its defaults or a YAML config, with key.sub=value overrides"
    )
    train.add_argument(
        "config",
        nargs="?",
        metavar="STAGE|CONFIG",
        help=f"a stage ({', '.join(STAGE_CONFIGS)}) to start from its defaults, or a stage config YAML (configs/*.yaml)",
    )
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 model.path=DIR")
    train.add_argument(
        "--help-config", metavar="STAGE", help="list every field of STAGE's config with help and default"
    )
    launcher = train.add_argument_group(
        "launcher", "start several training processes through torch's elastic launcher (as torchrun does)"
    )
    launcher.add_argument("--nproc", type=_positive_int, default=1, help="processes on this machine (default 1)")
    launcher.add_argument("--nnodes", type=_positive_int, default=1, help="machines taking part (default 1)")
    launcher.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    launcher.add_argument("--master-addr", help="address of the machine with --node-rank 0 (several machines)")
    launcher.add_argument("--master-port", type=_positive_int, help="its port, the same on every machine (29500)")
    train.set_defaults(func=cmd_train)

    toy = commands.add_parser("toy", help="write a tiny model, tokenizer and synthetic datasets (offline, seconds)")
    toy.add_argument("dir")
    toy.add_argument("--size", default="tiny", choices=["mini", "tiny", "small"])
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=cmd_toy)

    export = commands.add_parser("export", help="write a run's model as a plain Hugging Face directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--merge", action="store_true", help="merge LoRA/DoRA weights into the base model")
    export.add_argument(
        "--checkpoint",
        metavar="STEP",
        help="export this checkpoint (step-000040, or its path) instead of model/: the way out of a run killed "
        "before its end, sharded ones (fsdp, deepspeed) included",
    )
    export.set_defaults(func=cmd_export)

    score = commands.add_parser("score", help="score conversations or preference pairs with a trained reward model")
    score.add_argument("model", metavar="RM_DIR", help="a stage: reward run directory (or its model/ folder)")
    score.add_argument("data", help="a data file: preference pairs (accuracy is reported) or conversations")
    score.add_argument("--out", metavar="FILE", help="write one JSON row per record with its score(s)")
    score.add_argument("--batch-size", type=_positive_int, default=32)
    score.set_defaults(func=cmd_score)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate models on a data file: prompts, conversations/text, preference pairs or multiple choice",
        description="What is measured follows from what --data holds: prompts with references → greedy answers, "
        "exact match, gold reward, answer length, EOS rate (+ reward-model score, KL to a reference, win-rate); "
        "conversations or text → held-out loss and perplexity; preference pairs → reward-model accuracy (MODEL "
        "must be a reward model); multiple-choice rows {question, choices, answer} → log-likelihood accuracy.",
    )
    evaluate.add_argument(
        "models", nargs="+", metavar="MODEL", help="run directories, model directories or adapter directories"
    )
    evaluate.add_argument(
        "--data", required=True, metavar="FILE", help="the evaluation file (jsonl, json, csv, parquet)"
    )
    evaluate.add_argument(
        "--reward-model", metavar="RM", help="prompts: also report the mean reward-model score of the answers"
    )
    evaluate.add_argument(
        "--reference",
        metavar="REF",
        help="prompts: also report the KL to this reference model along each model's answers",
    )
    evaluate.add_argument(
        "--judge",
        metavar="RM_DIR|gold",
        help="prompts, 2+ models: win-rate of each model over the first, judged by a reward model or the gold reward",
    )
    evaluate.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="longest greedy answer (default 32)"
    )
    evaluate.add_argument(
        "--max-length",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="loss: truncate sequences to N tokens (default 2048)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="generation batch size (default 64; loss, KL and multiple-choice forwards use at most 8, 16, 16)",
    )
    evaluate.add_argument(
        "--out", metavar="FILE.json", help='write {"models": {MODEL: {metric: value}}} (answers included)'
    )
    evaluate.set_defaults(func=cmd_eval)

    pipeline = commands.add_parser("pipeline", help="run stages as a DAG; unchanged stages are reused, not rerun")
    pipeline.add_argument("config", metavar="PIPELINE", help="a pipeline YAML, or the name of a shipped one: demo")
    pipeline.add_argument("overrides", nargs="*", help="out=DIR, seed=N, or STAGE.key.sub=value")
    pipeline.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything downstream of it"
    )
    pipeline.add_argument("--quick", action="store_true", help="apply the file's quick: overrides")
    pipeline.add_argument("--dry-run", action="store_true", help="validate every stage config and print the order")
    pipeline.set_defaults(func=cmd_pipeline)

    loop = commands.add_parser(
        "loop",
        help="iterative RLHF: rounds of sample, label, retrain the reward model, DPO, and a gate before promotion",
        description="Run the rounds of a loop config (posttrain.loop), resuming where a killed run stopped; or "
        "`posttrain loop demo`: 3 rounds on the toy tasks after toy kit, pretraining and SFT, labels given by the "
        "tasks' checker through the label API.",
    )
    loop.add_argument("config", metavar="LOOP", help="a loop YAML, or demo")
    loop.add_argument("overrides", nargs="*", help="key.sub=value over the loop config (demo: STAGE.key=value)")
    loop.add_argument("--out", help="demo: output directory (default runs/loop_demo)")
    loop.add_argument("--seed", type=int, help="demo: seed (default 0)")
    loop.add_argument("--quick", action="store_true", help="demo: the short version (for tests)")
    loop.set_defaults(func=cmd_loop)

    demo = commands.add_parser("demo", help="the embedded default: toy model and data, then training end to end")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a shorter run (for tests)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server for one base model and many LoRA adapters, decoded together",
        description="Serve BASE (a model or run directory) and LoRA adapters over the OpenAI API (/v1/models, "
        "/v1/chat/completions, /v1/completions), with /v1/load_lora_adapter and /v1/unload_lora_adapter (admin: "
        "need --api-key) and /metrics. Requests for different adapters decode together in one batch.",
    )
    serve.add_argument("base", metavar="BASE", help="the base model: a model directory or a run directory")
    serve.add_argument(
        "--adapter", action="append", metavar="NAME=PATH", help="serve this adapter (pinned in memory); repeat"
    )
    serve.add_argument(
        "--adapter-dir",
        action="append",
        metavar="DIR",
        help="load DIR/NAME on demand when a request names NAME; run-time loads may read only here; repeat",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_positive_int, default=8000)
    serve.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY; enables adapter admin")
    serve.add_argument("--max-loaded", type=_positive_int, default=8, metavar="N", help="adapters kept in memory")
    serve.add_argument("--max-batch-size", type=_positive_int, default=32, metavar="N", help="rows decoded together")
    serve.add_argument(
        "--max-waiting", type=_positive_int, default=256, metavar="N", help="queued requests (429 past)"
    )
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, metavar="N", help="413 past")
    serve.set_defaults(func=cmd_serve)

    chat = commands.add_parser(
        "chat",
        help="talk to trained models in the terminal; several answer each message side by side",
        description="Chat with one or more models (run directories, model directories or adapters), each with its "
        "own conversation rendered by its chat template; replies stream as they are generated. "
        "In the session: /reset, /system TEXT, /history, /quit (or Ctrl-D).",
    )
    chat.add_argument(
        "models",
        nargs="+",
        metavar="MODEL_OR_RUN",
        help="a run directory (with model/), a model or an adapter directory",
    )
    chat.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="answer TEXT and exit instead of chatting; repeat for a scripted multi-turn conversation",
    )
    chat.add_argument("--system", metavar="TEXT", help="system prompt (kept by /reset)")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0, help="0 (default) is off")
    chat.add_argument("--seed", type=int, help="seed sampling, for reproducible replies at temperature > 0")
    chat.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="render with this built-in template or .jinja file instead of the tokenizer's own",
    )
    chat.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    chat.add_argument(
        "--columns",
        action="store_true",
        help="show all models' replies in columns once all have answered (no streaming)",
    )
    chat.set_defaults(func=cmd_chat)

    label = commands.add_parser(
        "label",
        help="human preference labelling: make items, serve the web app, export preference data, report agreement",
        description="Pairwise preference labelling on Llama 2's 8-point scale (docs/labelling.md): create items "
        "in a SQLite store, serve them to annotators (one URL each), export aggregated preference rows for the "
        "reward and DPO stages, and report agreement, gold accuracy, position bias and the arena board.",
    )
    label_commands = label.add_subparsers(dest="label_command", required=True)
    label_create = label_commands.add_parser(
        "create", help="add items: pairs from a file, or responses sampled from models (every pair of models)"
    )
    label_create.add_argument("db", metavar="DB", help="the label database (SQLite; created if missing)")
    label_source = label_create.add_mutually_exclusive_group()
    label_source.add_argument(
        "--pairs", metavar="FILE", help="rows {prompt, response_a, response_b} (or chosen/rejected), gold?"
    )
    label_source.add_argument("--prompts", metavar="FILE", help="prompts to sample --models on")
    label_create.add_argument("--models", nargs="+", metavar="MODEL", help="run, model or adapter directories")
    label_create.add_argument(
        "--battle", action="store_true", help="arena items: model names hidden until the annotator voted"
    )
    label_create.add_argument("--gold", metavar="FILE", help="hidden gold items: pairs rows, each with gold 1-8")
    label_create.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N")
    label_create.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 is greedy)")
    label_create.add_argument("--seed", type=int, default=0, help="sampling seed")
    label_create.add_argument("--template", metavar="NAME|FILE", help="chat template instead of the tokenizer's")
    label_create.set_defaults(func=cmd_label_create)
    label_serve = label_commands.add_parser(
        "serve", help="serve the labelling app; prints one URL (token included) per annotator; stops on SIGTERM"
    )
    label_serve.add_argument("db", metavar="DB")
    label_serve.add_argument("--host", default="127.0.0.1")
    label_serve.add_argument("--port", type=_positive_int, default=8000)
    label_people = label_serve.add_mutually_exclusive_group(required=True)
    label_people.add_argument(
        "--annotators", nargs="+", metavar="NAME", help="names, space- or comma-separated (tokens made and kept)"
    )
    label_people.add_argument("--tokens", metavar="FILE", help="one 'NAME TOKEN' per line")
    label_serve.add_argument(
        "--overlap", type=_positive_int, default=1, metavar="K", help="annotators per item (default 1)"
    )
    label_serve.add_argument(
        "--gold-rate", type=float, default=0.05, metavar="R", help="share of cards that are hidden gold items"
    )
    label_serve.add_argument(
        "--gold", metavar="FILE", help="add hidden gold items before serving: pairs rows, each with gold 1-8"
    )
    label_serve.set_defaults(func=cmd_label_serve)
    label_export = label_commands.add_parser("export", help="aggregated preference rows (JSONL) for reward/DPO")
    label_export.add_argument("db", metavar="DB")
    label_export.add_argument("--out", required=True, metavar="FILE", help="the preference JSONL to write")
    label_export.add_argument(
        "--margins",
        default="3,2,1,0",
        help="reward-model margin per degree: much better, better, slightly, negligibly (default 3,2,1,0)",
    )
    label_export.set_defaults(func=cmd_label_export)
    label_report_parser = label_commands.add_parser(
        "report", help="agreement (Cohen, Fleiss, Krippendorff, Gwet), gold accuracy, position bias, arena board"
    )
    label_report_parser.add_argument("db", metavar="DB")
    label_report_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    label_report_parser.add_argument(
        "--min-gold-accuracy", type=float, default=0.7, metavar="A", help="flag annotators under this gold accuracy"
    )
    label_report_parser.add_argument("--bootstrap-rounds", type=_positive_int, default=1000, metavar="N")
    label_report_parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    label_report_parser.set_defaults(func=cmd_label_report)

    data = commands.add_parser("data", help="look at a dataset before training on it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_inspect = data_commands.add_parser(
        "inspect",
        help="report format, invalid rows, token lengths, duplicates, turns and label balance of a dataset",
        description="Read a data file, folder or LLaMA-Factory dataset name (invalid rows are listed, not fatal) "
        "and report what a training run would see.",
    )
    data_inspect.add_argument(
        "source", metavar="PATH|NAME", help="a data file or folder, hf:org/name, or a dataset_info.json name"
    )
    data_inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    data_inspect.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="count tokens with this local tokenizer and its chat template (default: an offline approximation)",
    )
    data_inspect.add_argument(
        "--max-length",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="report the share of samples longer than N tokens (default 1024)",
    )
    data_inspect.add_argument(
        "--registry", metavar="FILE", help="dataset_info.json (or its folder) to look NAME up in; default ./ or ./data"
    )
    data_inspect.add_argument(
        "--kind", choices=KINDS, help="read the records as this kind (default: inferred from the first row)"
    )
    data_inspect.set_defaults(func=cmd_data_inspect)

    data_check = data_commands.add_parser("check", help="the preflight of a training config, without training")
    data_check.add_argument("config", metavar="STAGE|CONFIG", help="a stage (its defaults) or a stage config YAML")
    data_check.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    data_check.set_defaults(func=cmd_data_check)

    estimate = commands.add_parser(
        "estimate", help="memory per device before training: weights, gradients, optimizer, activations, logits, ..."
    )
    estimate.add_argument("config", metavar="STAGE|CONFIG", help="a stage (its defaults) or a stage config YAML")
    estimate.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    estimate.add_argument("--gpus", type=_positive_int, default=1, help="data-parallel devices (default 1)")
    estimate.add_argument("--gpu-mem", type=float, metavar="GIB", help="memory per device: fits, or what to change")
    estimate.add_argument("--json", action="store_true", help="one JSON object, bytes per component")
    estimate.add_argument("--explain", action="store_true", help="the formula behind each line")
    estimate.add_argument(
        "--probe", action="store_true", help="run 2 real steps and set the measured peak against the plan"
    )
    estimate.add_argument(
        "--probe-layers",
        type=_positive_int,
        metavar="N",
        help="probe a randomly initialised copy of the model with N decoder layers (no weights read)",
    )
    estimate.add_argument(
        "--time", action="store_true", help="run a sample of the steps and extrapolate the whole run's time"
    )
    estimate.add_argument(
        "--sample", type=float, help="share of the run's steps --time runs (default 0.01, at least 4)"
    )
    estimate.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, for --time's MFU")
    estimate.set_defaults(func=cmd_estimate)

    launch = commands.add_parser("launch", help="run training on a cluster")
    launch_commands = launch.add_subparsers(dest="launch_command", required=True)
    k8s = launch_commands.add_parser(
        "k8s",
        help="write Kubernetes manifests: a Kubeflow TrainJob or PyTorchJob, its config and a checkpoint volume",
        description="Print (or write to --out DIR) a PersistentVolumeClaim for the run directory, a ConfigMap with "
        "the run config and the job; every pod runs torchrun -m posttrain train, with resume=auto.",
    )
    k8s.add_argument("config", metavar="STAGE|CONFIG", help="a stage (its defaults) or a stage config YAML")
    k8s.add_argument("overrides", nargs="*", help="dotted overrides, as for train; paths are read inside the pods")
    # Checked by launch.k8s (one error line, exit 2) rather than by argparse, which prints its usage first.
    k8s.add_argument("--nodes", type=int, default=1, metavar="N", help="pods, one per node (default 1)")
    k8s.add_argument("--gpus-per-node", type=int, default=1, metavar="G", help="GPUs and processes per pod")
    k8s.add_argument("--image", metavar="IMAGE", help="(required) a container image with posttrain installed")
    k8s.add_argument("--kind", default="trainjob", help="trainjob (Kubeflow Trainer v2, default), pytorchjob, rayjob")
    k8s.add_argument(
        "--ttl-after-finished", type=int, metavar="SECONDS", help="rayjob: keep the finished Ray cluster (default 600)"
    )
    k8s.add_argument("--name", metavar="NAME", help="job name (default: from output_dir); run dir /checkpoints/NAME")
    k8s.add_argument("--storage", default="100Gi", metavar="SIZE", help="checkpoint volume size (default 100Gi)")
    k8s.add_argument("--storage-class", metavar="CLASS", help="StorageClass of the checkpoint volume")
    k8s.add_argument("--out", metavar="DIR", help="write DIR/NAME.yaml instead of printing the manifests")
    k8s.set_defaults(func=cmd_launch_k8s)
    return parser


def main(argv: list[str] | None = None) -> int:
    from posttrain.data.errors import DataError
    from posttrain.loop import LoopError
    from posttrain.models.loading import ModelLoadError
    from posttrain.pipeline import PipelineError
    from posttrain.roles import RoleFailed, StaleWeights
    from posttrain.runtime import NonFiniteLossError, TrainingInterrupted
    from posttrain.serve.adapters import AdapterError

    parser = build_parser()
    args, unparsed = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`train CONFIG --nproc 2 distributed.strategy=fsdp`).
    if unparsed and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in unparsed):
        args.overrides = [*args.overrides, *unparsed]
    elif unparsed:
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    handlers: dict[type[BaseException], Callable[[BaseException], int]] = {
        ConfigError: lambda e: _fail(str(e), 2),
        LaunchError: lambda e: _fail(str(e), 2),
        PipelineError: lambda e: _fail(str(e), 1),
        LoopError: lambda e: _fail(str(e), 1),
        DataError: lambda e: _fail(f"data error: {e}", 2),
        ModelLoadError: lambda e: _fail(str(e), 2),
        FileNotFoundError: lambda e: _fail(str(e), 2),
        NonFiniteLossError: lambda e: _fail(str(e), 1),
        RoleFailed: lambda e: _fail(str(e), 1),
        StaleWeights: lambda e: _fail(str(e), 1),
        AdapterError: lambda e: _fail(str(e), 2),
    }
    try:
        return args.func(args)
    except BrokenPipeError:  # `posttrain data inspect ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except TrainingInterrupted as interrupted:
        print(interrupted.message, file=sys.stderr)
        return int(interrupted.code)  # type: ignore[arg-type]
    except tuple(handlers) as error:
        return next(h for t, h in handlers.items() if isinstance(error, t))(error)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
