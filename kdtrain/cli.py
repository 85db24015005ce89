"""``kdtrain`` command line: one sub-command per stage, each writing to an artifacts folder."""

from __future__ import annotations

import argparse
import logging
import sys

from kdtrain.errors import KDError


def _pipeline(args: argparse.Namespace) -> int:
    from kdtrain.pipeline import run_pipeline

    folder = run_pipeline(args.out, args.stages.split(",") if args.stages else None, args.contracts, args.distill_config)
    print(f"artifacts written to {folder.root} ({len(folder.manifest.artifacts)} artifacts in manifest.json)")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from kdtrain.gates.verdict import unlock
    from kdtrain.train.config import load_config
    from kdtrain.train.loop import Distiller
    from kdtrain.train.world import World

    config = load_config(args.config)
    world = World.from_env()
    if not world.main:  # every rank logs the same lines; rank 0 speaks for them
        logging.getLogger("kdtrain").setLevel(logging.WARNING)
    distiller = Distiller(config, args.run_dir, artifacts=args.artifacts, world=world)
    distiller.setup(override_balance=args.override_balance, override_alerts=args.override_alerts,
                    unlock=lambda: unlock(config, distiller.artifacts, args.verdict, args.skip_gate))
    result = distiller.train(stop_after=args.steps)
    distiller.cleanup()
    if world.main:
        stopped = f" (stopped: {result.stopped})" if result.stopped else ""
        print(f"{args.run_dir}: step {result.step} of {config.optim.steps}{stopped}; {len(result.alerts)} balance alert(s); "
              f"log {args.run_dir}/log.jsonl")
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint

    for path in args.paths:
        print(f"{tokenizer_fingerprint(path)}  {path}")
    return 0


def _validate_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdtrain import atomic
    from kdtrain.data.corpus import Corpus
    from kdtrain.data.registry import load_registry
    from kdtrain.data.validate import validate_corpus

    registry, corpus = load_registry(args.registry), Corpus.load(args.corpus)
    validated, report = validate_corpus(corpus, registry, args.on_invalid)
    out = validated.save(args.out)
    report_file = Path(args.report) if args.report else out / "validation_report.json"
    atomic.write_json(report_file, report.to_json())
    print(f"validated {args.corpus}: {report.summary()}")
    print(f"corpus written to {out} ({len(validated.samples)} samples), report to {report_file}")
    return 0


def _migrate_data(args: argparse.Namespace) -> int:
    from kdtrain.data.corpus import Corpus
    from kdtrain.data.migrate import migrate_corpus
    from kdtrain.data.registry import load_registry

    registry, corpus = load_registry(args.registry), Corpus.load(args.corpus)
    migrated, report = migrate_corpus(corpus, registry)
    migrated.save(args.out)
    print(f"{args.corpus}: {report.summary()}; written to {args.out}")
    return 0


def _build_corpus(args: argparse.Namespace) -> int:
    from kdtrain.data.corpus import build_reference_corpus
    from kdtrain.data.registry import load_registry

    corpus = build_reference_corpus(load_registry(args.registry), args.per_scenario, args.seed)
    corpus.save(args.out)
    print(f"reference corpus written to {args.out} ({len(corpus.samples)} samples, sha256 {corpus.info().sha256})")
    return 0


def _init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdtrain.scaffold import InitOptions, init_project

    lengths = tuple(int(v) for v in args.lengths.split(","))
    config = init_project(InitOptions(args.teacher, Path(args.dir), Path(args.student) if args.student else None, lengths,
                                      args.name, args.version, args.steps, args.samples_per_scenario,
                                      args.teacher_model, args.tokenizer, args.api_key_env))
    print(f"project written to {args.dir}. Next:\n"
          f"  kdtrain pipeline --config {config} --contracts {args.dir}/contracts --out {args.dir}/artifacts\n"
          f"  pytest --kd-contracts {args.dir}/contracts -m golden --snapshot-update   # record the golden vectors of this build\n"
          f"  pytest --kd-contracts {args.dir}/contracts")
    return 0


def _add(args: argparse.Namespace) -> int:
    from kdtrain.add import add_artifact

    target = add_artifact(args.name, args.path, args.out, args.host_api)
    print(f"{args.name}: {args.path} registered in {args.out}/manifest.json (now at {target})")
    return 0


def _add_init_command(sub) -> None:
    add = sub.add_parser("add", help="register an artifact kdtrain did not build (a tokenizer, a checkpoint, an mlpackage, a corpus)")
    add.add_argument("name", metavar="NAME", help="its artifact name: tokenizer.student, student.checkpoint, coreml.fp16.512, ...")
    add.add_argument("path", metavar="PATH", help="the file or folder (copied into the artifacts folder)")
    add.add_argument("--out", required=True, help="the artifacts folder")
    add.add_argument("--host-api", help="a Core ML package: the host API it speaks (1.0: functions prefill and decode "
                     "sharing the KV-cache states; 1.1: and verify); without it, golden, prefill/decode and verify/decode "
                     "items fail saying why")
    add.set_defaults(func=_add)
    init = sub.add_parser("init", help="write a starter project (contracts, distill config) for your own teacher and student")
    init.add_argument("dir", metavar="DIR", help="project folder: contracts/, distill.yaml, artifacts/, golden/")
    init.add_argument("--teacher", required=True, help="a transformers model folder, a .gguf file, or an OpenAI-compatible "
                      "endpoint (http(s)://…/v1, with --teacher-model, --tokenizer and --student)")
    init.add_argument("--teacher-model", help="an endpoint: the model name to ask for")
    init.add_argument("--tokenizer", help="an endpoint: the served model's tokenizer folder")
    init.add_argument("--api-key-env", default="OPENAI_API_KEY", help="an endpoint: the variable that holds the key (default: %(default)s)")
    init.add_argument("--student", help="YAML with the student: layers (teacher layers to keep) and/or shape")
    init.add_argument("--lengths", default="512,1024", help="enumerated Core ML sequence lengths (default: %(default)s)")
    init.add_argument("--name", help="the teacher's name (default: the folder's or file's name)")
    init.add_argument("--version", help="the teacher's version (default: a hash of its weights)")
    init.add_argument("--steps", type=int, default=24, help="distillation steps of the starter run (default: %(default)s)")
    init.add_argument("--samples-per-scenario", type=int, default=6, help="corpus samples per scenario (default: %(default)s)")
    init.set_defaults(func=_init)


def _add_data_commands(sub) -> None:
    registry = {"default": "contracts/tool_registry.json", "help": "tool registry the data must fit (default: %(default)s)"}
    validate = sub.add_parser("validate-data", help="validate a corpus folder's tool calls against the tool registry")
    validate.add_argument("corpus", metavar="CORPUS_DIR")
    validate.add_argument("--registry", **registry)
    validate.add_argument("--out", required=True, help="folder for the validated corpus")
    validate.add_argument("--on-invalid", choices=("drop", "mark"), default="drop", help="drop invalid samples or keep them with meta.invalid")
    validate.add_argument("--report", help="report file (default: OUT/validation_report.json)")
    validate.set_defaults(func=_validate_data)
    migrate = sub.add_parser("migrate-data", help="rewrite a corpus folder to the registry's tool-schema version")
    migrate.add_argument("corpus", metavar="CORPUS_DIR")
    migrate.add_argument("--registry", **registry)
    migrate.add_argument("--out", required=True, help="folder for the migrated corpus")
    migrate.set_defaults(func=_migrate_data)
    build = sub.add_parser("build-corpus", help="generate the reference corpus (same seed, same bytes)")
    build.add_argument("--registry", **registry)
    build.add_argument("--out", required=True, help="corpus folder to write")
    build.add_argument("--per-scenario", type=int, default=6, help="samples per scenario (default: %(default)s)")
    build.add_argument("--seed", type=int, default=1234)
    build.set_defaults(func=_build_corpus)


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """What every stage reads, whether run by ``pipeline`` or alone: one definition, so a
    stage run alone cannot miss a setting the pipeline has."""
    parser.add_argument("--out", required=True, help="artifacts folder to write or update")
    parser.add_argument("--contracts", default="contracts", help="contract folder the stages read (shapes, islands, lint rules)")
    parser.add_argument("--config", "--distill-config", dest="distill_config", default="configs/distill_reference.yaml",
                        help="the distill config: teacher source, student, training (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from kdtrain.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="kdtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline = sub.add_parser("pipeline", help="build the reference artifacts folder end to end")
    _add_stage_arguments(pipeline)
    pipeline.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    pipeline.set_defaults(func=_pipeline)
    distill = sub.add_parser("distill", help="distil the student from the cached teacher targets (resumes a run folder)")
    distill.add_argument("--config", required=True, help="DistillConfig YAML (configs/distill_reference.yaml)")
    distill.add_argument("--run-dir", required=True,
                         help="run folder: checkpoints, log.jsonl, smoke.json, grad_norms.png, curriculum.json/.png")
    distill.add_argument("--artifacts", help="artifacts folder with the corpus, teacher cache and student (default: data.artifacts)")
    distill.add_argument("--steps", type=int, help="stop after this many more steps (default: to optim.steps)")
    distill.add_argument("--override-balance", action="store_true",
                         help="start even if the smoke run's balance check fails (logged)")
    distill.add_argument("--override-alerts", action="store_true",
                         help="continue past the curriculum telemetry's alerts (length collapse, early halts; logged, recorded)")
    distill.add_argument("--verdict", help="the mini pipeline's gate verdict (default: gates/verdict.json in the artifacts folder); "
                                           "a fresh run starts only on a passing verdict for its configuration, data, teacher and student")
    distill.add_argument("--skip-gate", action="store_true",
                         help="start without a passing verdict (logged, and recorded in every checkpoint of the run)")
    distill.set_defaults(func=_distill)
    evaluate = sub.add_parser("evaluate", help="the checkpoint gates (contracts/gates.yaml): halt calibration, curriculum, "
                                               "scenario evals; writes gates/verdict.json (same as pipeline --stages gates)")
    _add_stage_arguments(evaluate)
    evaluate.set_defaults(func=_pipeline, stages="gates")
    budget = sub.add_parser("budget", help="the on-device memory budget (contracts/runtime_budget.yaml): writes "
                                           "runtime/runtime_config.json and memory.png, logs the table (same as pipeline --stages runtime)")
    _add_stage_arguments(budget)
    budget.set_defaults(func=_pipeline, stages="runtime")
    for stage in ("export", "convert", "quantize", "judge"):
        one = sub.add_parser(stage, help=f"run the {stage} stage alone (same as pipeline --stages {stage})")
        _add_stage_arguments(one)
        one.set_defaults(func=_pipeline, stages=stage)
    fingerprint = sub.add_parser("fingerprint", help="print the meaning fingerprint of tokenizer folders or tokenizer.json files")
    fingerprint.add_argument("paths", nargs="+")
    fingerprint.set_defaults(func=_fingerprint)
    _add_data_commands(sub)
    _add_init_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except KDError as exc:
        print(f"kdtrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
