"""The ``ood-ray`` command line: data shards, the embedded benchmark, training, comparing, tuning."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from . import metric_names
from .cli_data import add_data_commands
from .config import ConfigError, TrackingError, TrainConfig, redact
from .data.manifest import DataError


def _parse_value(item: str, text: str):
    """A ``--param`` value as YAML (numbers, lists, null...); a YAML error names the flag."""
    import re

    import yaml

    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
        return float(text)  # 1e9: YAML 1.1 reads exponents without a dot as strings
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--param {item!r}: not a YAML value ({str(e).splitlines()[0]})") from None


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--no-nesterov``, ...)."""
    p.add_argument("--config", help="YAML/JSON file with config keys; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if f.name == "method_params":
            p.add_argument("--param", dest="method_params", action="append", metavar="KEY=VALUE", help="a method hyperparameter (repeatable), e.g. --param lam=0.5")
        elif typing.get_origin(hint) is list:
            p.add_argument(flag, dest=f.name, nargs="+", type=args[0], default=None)
        elif base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=f.name, type=base if base in (int, float) else str, default=None)


def config_from_args(ns: argparse.Namespace, defaults: dict | None = None) -> TrainConfig:
    """The TrainConfig of the command line: ``defaults`` < the ``--config`` file < flags."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {k: getattr(ns, k) for k in names if getattr(ns, k, None) is not None}
    if "method_params" in overrides:
        params = {}
        for item in overrides["method_params"]:
            if "=" not in item:
                raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            params[k] = _parse_value(item, v)
        overrides["method_params"] = params
    if "detectors" in overrides:  # --detectors knn vim, or knn,vim
        overrides["detectors"] = [d for item in overrides["detectors"] for d in item.split(",") if d]
    if ns.config:
        return TrainConfig.from_file(ns.config, defaults=defaults, **overrides)
    return TrainConfig.from_dict({**(defaults or {}), **overrides}, where="command line")


#: Defaults of ``ood-ray tune`` where they differ from ``ood-ray train``: shorter trials of one
#: worker each, which train inside their Tune trial (no Ray Train run to start per trial) and run
#: one per CPU (two at a time on a 2-core laptop), δ set on val ID at 95% acceptance, an accuracy guard.
TUNE_DEFAULTS = {"epochs": 8, "num_workers": 1, "cpus_per_worker": 1.0, "delta_tpr": 0.95, "min_val_acc": 0.9}


#: Defaults of ``ood-ray compare --tune-trials N``: the sweeps' trials and the seed runs train alike
#: (one worker each, so that trials run side by side on a small machine; same guard as ``tune``).
COMPARE_TUNED_DEFAULTS = {k: v for k, v in TUNE_DEFAULTS.items() if k != "epochs"}  # epochs stay train's 15


def cmd_tune(ns: argparse.Namespace) -> int:
    from .tuning.config import SweepConfig
    from .tuning.report import format_outcome
    from .tuning.sweep import run_sweep

    if ns.method is None:
        from .methods import METHODS

        raise ConfigError(f"--method is required for tune; choose one of: {', '.join(METHODS)}")
    base = config_from_args(ns, defaults=TUNE_DEFAULTS)
    sweep = SweepConfig(
        method=ns.method,
        base=base,
        num_trials=ns.num_trials,
        gpus_per_worker=ns.gpus_per_worker,
        trial_cpus=ns.trial_cpus,
        trial_runner=ns.trial_runner,
        concurrency=ns.concurrency,
        name=ns.name,
        seed=ns.sweep_seed,
        asha=ns.asha,
        scheduler=ns.scheduler,
        pbt_interval=ns.pbt_interval,
        grace_period=ns.grace_period,
        reduction_factor=ns.reduction_factor,
        include_default=ns.default_trial,
        register_name=ns.register_name,
        alias=ns.alias,
        resume=ns.resume,
        optuna_storage=ns.optuna_storage,
    )
    outcome = run_sweep(sweep)
    print()
    print(redact(format_outcome(outcome)))
    from . import tracking

    print(tracking.browse_hint(base.mlflow_uri, base.experiment))
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from .train import run_training

    cfg = config_from_args(ns)
    out = run_training(cfg)
    m = out.metrics
    print()
    print(f"Finished in {out.wall_time_s:.0f}s: {cfg.method} / {cfg.backbone}, {cfg.epochs} epochs on {cfg.num_workers} workers")
    print(f"  test accuracy {m.get('test_acc', float('nan')):.4f}   ECE {m.get('test_ece', float('nan')):.4f}")
    for line in metric_names.text_table(m, "test", out.ood_sets):
        print("  " + line)
    print(f"  MLflow run {out.run_id} (experiment {out.experiment!r})")
    print(f"  checkpoint {redact(out.checkpoint_path)}")
    from . import tracking

    print("  " + tracking.browse_hint(out.tracking_uri, out.experiment))
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare_methods
    from .methods import METHODS

    methods = ns.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if ns.tune_trials < 0 or ns.seeds < 1:
        raise ConfigError(f"--tune-trials must be >= 0 and --seeds >= 1 (got {ns.tune_trials} and {ns.seeds})")
    base = config_from_args(ns, defaults=COMPARE_TUNED_DEFAULTS if ns.tune_trials else None)
    options = {k: getattr(ns, k) for k in ("concurrency", "asha") if getattr(ns, k) is not None}
    result = compare_methods(base, methods, ns.out, tune_trials=ns.tune_trials, seeds=ns.seeds, sweep_options=options)
    print()
    print(result.table)
    print(f"table written to {result.path}; MLflow parent run {result.parent_run_id} ({result.wall_time_s / 60:.1f} min)")
    from . import tracking

    print(tracking.browse_hint(base.mlflow_uri, base.experiment))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    import os

    from .config import default_tracking_uri
    from .serving import demo

    if not 1 <= ns.port <= 65535:
        raise ConfigError(f"--port {ns.port}: choose a port in [1, 65535]")
    tracking = ns.tracking_uri or default_tracking_uri()
    os.environ[demo.ENV["tracking_uri"]] = tracking  # the page runs in this process and reads them
    if ns.model:
        local = Path(ns.model)
        os.environ[demo.ENV["model"]] = str(local.resolve()) if local.exists() else ns.model
    if ns.mlflow_ui:
        os.environ[demo.ENV["ui"]] = ns.mlflow_ui
    which = ns.model or "the newest registered ood-ray-* model"
    print(f"ood-ray demo at http://{ns.address}:{ns.port} (model: {which}; tracking {redact(tracking)}); Ctrl-C stops it", flush=True)
    return demo.serve(str(Path(demo.__file__).with_name("demo_app.py")), ns.port, ns.address)


def cmd_toy(ns: argparse.Namespace) -> int:
    from .config import default_tracking_uri, normalize_tracking_uri
    from .toy import DEFAULT_TOY_METHODS, run_toy

    uri = ns.mlflow_uri or (normalize_tracking_uri(default_tracking_uri()) if ns.mlflow else None)
    res = run_toy(out=ns.out, seed=ns.seed, methods=ns.methods or list(DEFAULT_TOY_METHODS), mlflow_uri=uri, experiment=ns.experiment)
    print(f"wrote {res['path']} in {res['seconds']:.1f}s")
    for name, r in res["methods"].items():
        print(f"  {name:17s} val_acc {r['val_acc']:.3f}  δ {r['delta']:.3f} on {r['threshold_score']}  AUROC vs the box {r['auroc_box']:.3f}")
    if res["run_id"]:
        from . import tracking

        print(f"MLflow run {res['run_id']} (experiment {ns.experiment!r}); " + tracking.browse_hint(uri, ns.experiment))
    return 0












def cmd_evaluate(ns: argparse.Namespace) -> int:
    from .detector_eval import evaluate_checkpoint, evaluate_imported

    detectors = [d for item in ns.detectors for d in item.split(",") if d] if ns.detectors else None
    common = dict(data=ns.data, tracking_uri=ns.tracking_uri, experiment=ns.experiment, out=ns.out, fit_samples=ns.fit_samples, batch_size=ns.batch_size, log_mlflow=ns.mlflow)
    if ns.model:
        table = evaluate_imported(ns.model, ns.pretrained, detectors, input_size=ns.input_size, **common)
    else:
        if ns.pretrained or ns.input_size:
            raise ConfigError("--pretrained and --input-size go with --model (a checkpoint carries its weights and preprocessing)")
        table = evaluate_checkpoint(ns.checkpoint, detectors, **common)
    print()
    print(table.markdown())
    chosen = table.val_choice()
    auroc = table.metrics.get(metric_names.mean_key("test", "auroc", metric_names.ALL, chosen), float("nan"))
    print(f"chosen on val: {chosen} (test AUROC {auroc:.4f})   best on test: AUROC {table.best()}, FPR95 {table.best('fpr95')}   ({table.wall_time_s:.0f}s)")
    print(f"wrote {table.markdown_path}")
    if table.run_id:
        from . import tracking
        from .config import default_tracking_uri

        print(f"MLflow run {table.run_id}; " + tracking.browse_hint(ns.tracking_uri or default_tracking_uri(), ns.experiment))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    import json

    from .serving import ModelLoadError, load_predictor, predict

    try:
        predictor = load_predictor(ns.model, ns.tracking_uri, delta=ns.delta)
        rows = predict(predictor, ns.images)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:  # messages name the URI / file
        print(f"ood-ray: error: {redact(str(e))}", file=sys.stderr)
        return 2
    for r in rows:
        if ns.json:
            print(json.dumps(r))
            continue
        parts = [r["image"], f"class={r['class_name']}", f"{r['score_name']}={r['score']:.4f}"]
        if r["threshold_score"] != r["score_name"]:  # e.g. DisMax: score es, δ applies to mps
            parts.append(f"{r['threshold_score']}={r['threshold_value']:.4f}")
        parts.append("δ=off" if r["delta"] is None else f"δ={r['delta']:.4f}")
        parts.append("UNKNOWN" if r["unknown"] else "known")
        print("  ".join(parts))
    return 0


VERBOSE_HELP = "show Ray's, Tune's and MLflow's own log lines too (hidden by default where they repeat the progress lines or need no action)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ood-ray", description="Train and tune OOD detectors on Ray, tracked in MLflow.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model on Ray Train and log it to MLflow")
    add_train_args(t)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", help="train several methods with the same settings and tabulate their test metrics")
    add_train_args(c)
    c.add_argument("--methods", nargs="+", help="methods to compare (default: all registered)")
    c.add_argument("--out", help="Markdown file for the table (default: <results>/compare-<time>.md)")
    c.add_argument("--tune-trials", type=int, default=0, help="first tune every method with a sweep of N trials (same budget for each); 0 = untuned defaults")
    c.add_argument("--seeds", type=int, default=1, help="train each method's configuration with this many seeds (from --seed on); >= 2 gives 95%% CIs and paired tests against softmax")
    c.add_argument("--concurrency", type=int, help="sweep trials at once (default: as many as fit; 1 makes a sweep reproducible)")
    c.add_argument("--asha", action=argparse.BooleanOptionalAction, default=None, help="ASHA early stopping in the sweeps (default: on)")
    c.set_defaults(fn=cmd_compare)

    tu = sub.add_parser("tune", help="search a method's hyperparameters with Ray Tune + Optuna, tracked in MLflow")
    add_train_args(tu)
    tu.add_argument("--num-trials", type=int, default=8, help="Optuna trials (the first is the untuned default configuration)")
    tu.add_argument("--gpus-per-worker", type=float, help="GPUs per Train worker (default: 1 if the cluster has GPUs, else 0)")
    tu.add_argument("--trial-cpus", type=float, default=0.5, help="CPUs of each trial's driver process when it runs a TorchTrainer (--trial-runner train)")
    tu.add_argument(
        "--trial-runner",
        choices=("auto", "tune", "train"),
        default="auto",
        help="where a trial trains: tune = in its Tune trial process (one worker; no Ray Train run to start), "
        "train = a Ray Train TorchTrainer (any number of workers); auto (default) = tune when --num-workers is 1",
    )
    tu.add_argument("--concurrency", type=int, help="trials at once (default: as many as the cluster's resources allow)")
    tu.add_argument("--name", help="sweep name (default: <method>-sweep-<time>); names the Tune folder and the MLflow parent run")
    tu.add_argument("--resume", action="store_true", help="continue an interrupted sweep (--name, or the latest sweep of the method)")
    tu.add_argument("--sweep-seed", type=int, default=0, help="seed of Optuna's TPE sampler")
    tu.add_argument(
        "--scheduler",
        choices=("asha", "pbt", "pb2", "none"),
        help="trial scheduler: asha = early stopping of poor trials (Optuna suggests each trial's values); pbt = Population Based "
        "Training (poor trials continue from good trials' checkpoints with perturbed lr and method parameters; --trial-runner tune); "
        "pb2 = the same, with the new values chosen by a GP bandit within the search space's ranges (Parker-Holder et al. 2020); "
        "none (default: asha, or none with --no-asha)",
    )
    tu.add_argument("--pbt-interval", type=int, default=2, help="PBT/PB2: epochs between a trial's exploit/explore steps (default 2)")
    tu.add_argument("--asha", action=argparse.BooleanOptionalAction, default=True, help="ASHA early stopping on the per-epoch objective (--no-asha = --scheduler none)")
    tu.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default: a quarter of --epochs, at least 1)")
    tu.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA keeps the top 1/factor at each rung")
    tu.add_argument("--default-trial", action=argparse.BooleanOptionalAction, default=True, help="run the untuned default configuration as the first trial")
    tu.add_argument("--register-name", help="MLflow registered model name (default: ood-ray-<method>; '' = don't register)")
    tu.add_argument("--alias", default="champion", help="alias set on the best trial's registered version, with a model card as its description (default: champion, so models:/ood-ray-<method>@champion; '' = none)")
    tu.add_argument("--optuna-storage", help="Optuna RDB URL (default: sqlite under the storage path)")
    tu.set_defaults(fn=cmd_tune)

    ev = sub.add_parser("evaluate", help="score a trained checkpoint with every post-hoc detector: one table of test AUROC / FPR95 / AUPR-In per OOD set")
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder, MLflow model folder, or URI (models:/<name>/<version>, runs:/<run_id>/model)")
    which.add_argument("--model", help="a model trained elsewhere: torchvision:<name> or timm:<name> (with --pretrained), or module:function returning an nn.Module classifier or (backbone, head) (docs/finetune.md)")
    ev.add_argument("--pretrained", help="with --model: imagenet (the library's default weights, from its cache or downloaded) or a weights FILE (state_dict)")
    ev.add_argument("--input-size", type=int, help="with --model: the network's input size in pixels (default: the weights' own, e.g. 224)")
    ev.add_argument("--detectors", nargs="+", help="detectors to score (names, or comma-separated; default: all that fit the model's head)")
    ev.add_argument("--data", help="benchmark.json to evaluate on (default: the one the checkpoint was trained on)")
    ev.add_argument("--out", help="Markdown file for the table (default: <results>/detectors-<time>.md)")
    ev.add_argument("--tracking-uri", "--mlflow-uri", dest="tracking_uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the results folder's sqlite store)")
    ev.add_argument("--experiment", default="ood-ray", help="MLflow experiment of the evaluation run (default: ood-ray)")
    ev.add_argument("--fit-samples", type=int, default=50_000, help="train samples the detectors are fitted on (at most this many, evenly spread over the train split)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True, help="log the table to MLflow (default: on)")
    ev.set_defaults(fn=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify image files with a logged model; UNKNOWN when the OOD score is below δ")
    pr.add_argument("--model", required=True, help="models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/model, or a local model / checkpoint folder")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG/JPEG/...), converted to the model's mode, never resized")
    pr.add_argument("--tracking-uri", "--mlflow-uri", dest="tracking_uri", help="MLflow tracking (and registry) URI (default: $MLFLOW_TRACKING_URI or the project's sqlite store)")
    pr.add_argument("--delta", type=float, help="threshold δ on the model's threshold score instead of its own: in [0, 1] for a probability (msp, confidence, mps), any number for a detector's score")
    pr.add_argument("--json", action="store_true", help="one JSON object per line, with every prediction column")
    pr.set_defaults(fn=cmd_predict)

    de = sub.add_parser("demo", help="the \"Don't know\" web page: upload images, see the class or \"Don't know\" (Streamlit)")
    de.add_argument("--model", help="models:/<name>/<version>, runs:/<run_id>/model or a model / checkpoint folder (default: the newest version of any registered ood-ray-* model; the page can switch)")
    de.add_argument("--tracking-uri", "--mlflow-uri", dest="tracking_uri", help="MLflow tracking (and registry) URI (default: $MLFLOW_TRACKING_URI or the project's sqlite store)")
    de.add_argument("--port", type=int, default=8501, help="port of the page (default 8501)")
    de.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 serves other machines)")
    de.add_argument("--mlflow-ui", help="address of a running MLflow UI (e.g. http://127.0.0.1:5000), to link each model to its run")
    de.set_defaults(fn=cmd_demo)

    ty = sub.add_parser("toy", help="train the methods on 2-D toy data in-process and draw their OOD-score maps")
    ty.add_argument("--out", default="toy.png", help="PNG file to write (default: toy.png)")
    ty.add_argument("--seed", type=int, default=0, help="seed of the data and of every model (the same seed gives the same maps)")
    ty.add_argument("--methods", nargs="+", help="any of softmax outlier_exposure confidence dismax logitnorm t2fnorm (default: the first four)")
    ty.add_argument("--mlflow", action="store_true", help="log the figure and each method's parameters as one MLflow run ($MLFLOW_TRACKING_URI or the project's sqlite store)")
    ty.add_argument("--mlflow-uri", help="log to this tracking URI (implies --mlflow)")
    ty.add_argument("--experiment", default="ood-ray-toy", help="MLflow experiment (default: ood-ray-toy)")
    ty.set_defaults(fn=cmd_toy)

    add_data_commands(sub)
    for command in sub.choices.values():  # also after the command: `python jobs/tune_dismax.py -v`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


#: Errors that come from what the user gave (a value, a file, an image, a missing tool): one line
#: and exit 2. Anything else is a bug: one line saying so and exit 1. ``--debug`` shows the traceback.
USER_ERRORS = (ConfigError, DataError, TrackingError, ValueError, TypeError, KeyError, IndexError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in logs
    ns = build_parser().parse_args(argv)
    from . import console

    console.quiet(ns.verbose)
    try:
        return ns.fn(ns)
    except KeyboardInterrupt:
        if ns.debug:
            raise
        print("ood-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if ns.debug:
            raise
        ours = isinstance(e, ConfigError | DataError | TrackingError)
        text = redact(str(e) if ours else f"{type(e).__name__}: {e}").strip()
        line = text if ours else (text.splitlines() or [type(e).__name__])[0]
        if isinstance(e, USER_ERRORS) or type(e).__name__ in ("DecompressionBombError", "YAMLError", "ModelLoadError"):
            print(f"ood-ray: error: {line}" + ("" if ours else " (--debug shows the traceback)"), file=sys.stderr)
            return 2
        print(f"ood-ray: internal error: {line} (--debug shows the traceback; please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
