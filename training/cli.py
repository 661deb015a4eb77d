"""The trainer's subcommands of ``ranker``: generate, train, evaluate, export, push-features,
tune, report, build-log, ab-report. :func:`register` adds them to the command line
:mod:`ranker.cli` builds (found through the ``ranker.commands`` entry point); each job imports
what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ranker.cli import add_overrides, parse_value
from ranker.errors import RankerError


def cmd_generate(a: argparse.Namespace) -> None:
    from training.synth import WorldConfig, generate

    fields: dict[str, Any] = {}
    for o in a.overrides:
        key, sep, raw = o.partition("=")
        if not sep:
            raise RankerError(f"--set {o!r} is not of the form key=value")
        fields[key] = parse_value(raw)
    for name in ("seed", "n_users", "n_videos", "n_requests"):
        if getattr(a, name) is not None:
            fields[name] = getattr(a, name)
    from pydantic import ValidationError

    try:
        cfg = WorldConfig(**fields)
    except ValidationError as e:
        raise RankerError(f"invalid world settings: {e}") from None
    t0 = time.perf_counter()
    summary = generate(cfg, Path(a.out), progress=not a.quiet)
    print(
        f"wrote {a.out} in {time.perf_counter() - t0:.1f}s: {summary.n_rows:,} impressions in "
        f"{len(summary.log_files)} files, {summary.n_users:,} users, {summary.n_videos:,} videos; "
        f"click rate {summary.click_rate:.3f}, likes per click {summary.like_per_click:.3f}, "
        f"ratings per click {summary.rating_per_click:.3f} (details: {a.out}/world.json)"
    )


def cmd_train(a: argparse.Namespace) -> None:
    import os

    from ranker.config import load_config
    from training.evaluate import format_gate_table, format_table
    from training.loop import train

    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # The shortcut re-launches this command under torchrun, one process per rank.
        load_config(a.config, a.overrides)  # fail fast, before starting N processes
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={a.nproc}",
            "-m",
            "ranker",
            "train",
            "--config",
            str(a.config),
        ]
        for o in a.overrides:
            cmd += ["--set", o]
        cmd += [f for f, on in (("--quiet", a.quiet), ("--no-export", a.no_export)) if on]
        import subprocess

        rc = subprocess.run(cmd, check=False).returncode
        if rc != 0:
            raise RankerError(f"distributed training failed (torchrun exit code {rc})")
        return
    config = load_config(a.config, a.overrides)
    result = train(config, progress=not a.quiet, export=not a.no_export, resume=a.resume)
    if result.artifact is None and "WORLD_SIZE" in os.environ:
        return  # not rank 0: rank 0 reports
    print(
        f"\ntrained in {result.seconds:.1f}s ({result.rows_per_second:,.0f} rows/s while training)"
    )
    print(format_table(result.metrics))
    if result.gate_utilisation:  # a collapsed gate (one expert ~1.0) shows here
        print("\ngate utilisation (mean gate weight per expert on the validation split):")
        print(format_gate_table(result.gate_utilisation))
    if result.artifact:
        print(f"artifact: {result.artifact}")


def cmd_evaluate(a: argparse.Namespace) -> None:
    from training.offline import evaluate_artifact

    metrics = evaluate_artifact(
        Path(a.artifact),
        log=a.log,
        split=a.split,
        progress=not a.quiet,
        out=a.out,
        ranking=Path(a.ranking) if a.ranking else None,
        k=a.k,
    )
    if a.json:
        print(json.dumps(metrics, indent=2))


def cmd_export(a: argparse.Namespace) -> None:
    from training.offline import export_checkpoint

    path = export_checkpoint(Path(a.checkpoint), Path(a.root) if a.root else None)
    print(f"artifact: {path}")


def cmd_push_features(a: argparse.Namespace) -> None:
    import os

    from ranker.config import load_config
    from ranker.feature_store import DEFAULT_PREFIX, redact
    from training.push import push_files, rollback

    url = a.redis_url or os.environ.get("RANKER_REDIS_URL") or "redis://127.0.0.1:6379/0"
    prefix = a.prefix or os.environ.get("RANKER_REDIS_PREFIX") or DEFAULT_PREFIX
    if a.rollback:
        current, previous = rollback(url, prefix)
        print(f"{redact(url)} {prefix}: version {current} is current again ({previous} kept)")
        return
    d = load_config(a.config, a.overrides).data
    users, videos = a.users or d.users, a.videos or d.videos
    if users is None or videos is None:
        raise RankerError(
            f"{a.config} names no {'users' if users is None else 'videos'} table (data.users / "
            "data.videos): nothing to push; give --users and --videos"
        )
    r = push_files(
        url,
        Path(users),
        Path(videos),
        d.user_key,
        d.video_key,
        prefix,
        a.batch_size,
        progress=not a.quiet,
        writers=a.writers,
    )
    rows = ", ".join(f"{n:,} {s}s" for s, n in r.rows.items())
    print(
        f"pushed version {r.version} ({rows}) to {redact(url)} {prefix} in {r.seconds:.2f}s: "
        f"{r.rows_per_second:,.0f} rows/s; previous version {r.previous or 'none'} kept for "
        f"rollback; removed {r.removed or 'nothing'}"
    )
    for source, cols in r.skipped.items():
        print(f"note: {source} columns of unsupported types were not pushed: {cols}")


def cmd_push_state(a: argparse.Namespace) -> None:
    import os

    from ranker.artifact import load_artifact
    from ranker.feature_store import DEFAULT_PREFIX, redact
    from ranker.live_store import STATE_TTL_S
    from training.push_state import push_state_files

    url = a.redis_url or os.environ.get("RANKER_REDIS_URL") or "redis://127.0.0.1:6379/0"
    prefix = a.prefix or os.environ.get("RANKER_REDIS_PREFIX") or DEFAULT_PREFIX
    config = load_artifact(Path(a.artifact)).config
    if config.live is None:
        raise RankerError(f"{a.artifact}: the model has no live counters ([live]): no state")
    logs = [Path(p) for p in (a.log or [config.data.log])]
    r = push_state_files(
        url,
        config,
        logs,
        prefix,
        a.ttl_s or STATE_TTL_S,
        a.batch_size,
        progress=not a.quiet and sys.stderr.isatty(),
    )
    counts = ", ".join(f"{c} {n:,}" for c, n in r.entities.items())
    print(
        f"pushed live counter state from {', '.join(map(str, logs))} to {redact(url)} {prefix} "
        f"({counts} entities) in {r.seconds:.2f}s: {r.per_second:,.0f} entities/s"
    )


def cmd_tune(a: argparse.Namespace) -> None:
    from training.tune import print_summary, run_tune

    result, paths = run_tune(
        Path(a.artifact),
        Path(a.out),
        log=a.log,
        split=a.split,
        ranking=Path(a.ranking) if a.ranking else None,
        maximize=a.maximize,
        minimize=a.minimize,
        constraints=a.constraints,
        k=a.k,
        formula=a.formula,
        heads=a.heads.split(",") if a.heads else None,
        transforms=a.transforms,
        samples=a.samples,
        refine=a.refine,
        holdout=a.holdout,
        seed=a.seed,
        x=a.x,
        y=a.y,
        progress=not a.quiet,
        as_variant=a.as_variant,
        share=a.share,
        into=Path(a.into) if a.into else None,
    )
    print_summary(result, paths)


def cmd_report(a: argparse.Namespace) -> None:
    from training.report import build_report

    index = build_report(
        Path(a.artifact),
        Path(a.out) if a.out else None,
        run_dir=Path(a.run_dir) if a.run_dir else None,
        log=a.log,
        split=a.split,
        gate_records=a.gate_records,
        tune_dir=Path(a.tune) if a.tune else None,
        progress=not a.quiet,
    )
    print(f"report: {index}")


def cmd_build_log(a: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from training.build_log import DEFAULT_LABELS, BuildLogConfig, LabelRule, build_log

    labels = {} if a.no_default_labels else dict(DEFAULT_LABELS)
    for spec in a.labels:
        etype, sep, rest = spec.partition("=")
        column, _, how = rest.partition(":")
        if not sep or not etype or not column:
            raise RankerError(f"--label {spec!r} is not of the form TYPE=COLUMN[:flag|sum|value]")
        try:
            labels[etype] = LabelRule(column=column, how=how or "flag")
        except ValidationError:
            raise RankerError(f"--label {spec!r}: the kind must be flag, sum or value") from None
    if not labels:
        raise RankerError("no label rules: give --label TYPE=COLUMN[:KIND]")
    try:
        config = BuildLogConfig(window=a.window, labels=labels, time_column=a.time_column)
    except ValidationError as e:
        raise RankerError(f"invalid build-log settings: {e.errors()[0]['msg']}") from None
    r = build_log(
        Path(a.exposures),
        Path(a.events),
        Path(a.out),
        config,
        progress=not a.quiet and sys.stderr.isatty(),
    )
    attributed = ", ".join(f"{n:,} {t}" for t, n in r.attributed.items()) or "none"
    print(
        f"wrote {a.out}: {r.exposures:,} impressions of {r.requests:,} requests in "
        f"{len(r.files)} files in {r.seconds:.1f}s; events {r.events:,}, as labels: {attributed}"
    )
    lost = sum(r.unattributed.values())
    if lost:
        why = "; ".join(f"{n:,} {reason}" for reason, n in r.unattributed.items())
        print(f"unattributed events: {lost:,} ({why})")
    if r.unmapped:
        types = ", ".join(f"{n:,} {t}" for t, n in r.unmapped.items())
        print(f"events of types without a label rule (not used): {types}")
    if r.duplicate_events:
        print(f"duplicate event ids (kept once): {r.duplicate_events:,}")


def cmd_ab_report(a: argparse.Namespace) -> None:
    from training.ab_report import ab_report, format_report

    report = ab_report(Path(a.log), by=a.by, control=a.control, user_key=a.user_key)
    print(json.dumps(report, indent=2) if a.json else format_report(report))


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the trainer's subcommands to ``ranker``'s subparsers."""
    g = sub.add_parser("generate", help="write the synthetic world (log, users, videos, truth)")
    g.add_argument("--out", default="data/default", help="output directory")
    g.add_argument("--seed", type=int)
    g.add_argument("--n-users", dest="n_users", type=int)
    g.add_argument("--n-videos", dest="n_videos", type=int)
    g.add_argument("--n-requests", dest="n_requests", type=int)
    g.add_argument("--quiet", action="store_true")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any world setting, e.g. --set position_bias=0.5 (see docs/synthetic-world.md)",
    )
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="fit the model on the log's training split, validate, export")
    t.add_argument("--config", default="configs/default.toml")
    t.add_argument("--no-export", action="store_true", help="skip writing the artifact")
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train data-parallel in N processes (torchrun --standalone --nproc-per-node N)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from training.run_dir/checkpoint.pt (same config; epochs may grow)",
    )
    t.add_argument("--quiet", action="store_true")
    add_overrides(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="per-head metrics of an artifact on a log")
    e.add_argument("--artifact", default="artifacts/default", help="version dir or its parent")
    e.add_argument("--log", help="Parquet log; default: the artifact config's")
    e.add_argument("--split", choices=["validation", "train", "all"], default="validation")
    e.add_argument("--out", help="write the metrics JSON here")
    e.add_argument(
        "--ranking",
        help="ranking config for the ranking-score metrics; default: the artifact's own",
    )
    e.add_argument("--k", type=int, default=10, help="cut-off for NDCG@k")
    e.add_argument("--json", action="store_true", help="also print the JSON")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write an artifact from a training checkpoint")
    x.add_argument("--checkpoint", default="runs/default/checkpoint.pt")
    x.add_argument("--root", help="artifact root; default: the config's export.artifact_root")
    x.set_defaults(func=cmd_export)

    f = sub.add_parser(
        "push-features", help="load the users and videos tables into Redis as a new version"
    )
    f.add_argument("--config", default="configs/default.toml", help="table paths and keys")
    f.add_argument("--users", help="users table; default: the config's data.users")
    f.add_argument("--videos", help="videos table; default: the config's data.videos")
    f.add_argument(
        "--redis-url",
        help="default: RANKER_REDIS_URL, else redis://127.0.0.1:6379/0; redis+cluster://host:port "
        "(or RANKER_REDIS_CLUSTER=1) for a Redis Cluster",
    )
    f.add_argument("--prefix", help="key prefix; default: RANKER_REDIS_PREFIX, else ranker:fs")
    f.add_argument("--batch-size", type=int, default=5000, help="rows per pipelined round trip")
    f.add_argument(
        "--writers", type=int, default=1, help="batches written at once (threads; a cluster)"
    )
    f.add_argument("--rollback", action="store_true", help="make the previous version current")
    f.add_argument("--quiet", action="store_true")
    add_overrides(f)
    f.set_defaults(func=cmd_push_features)

    p = sub.add_parser(
        "push-state", help="load live counter state from a log into Redis (every worker's)"
    )
    p.add_argument("--artifact", default="artifacts/default", help="the model whose counters")
    p.add_argument(
        "--log", action="append", help="Parquet log (repeatable); default: the artifact's data.log"
    )
    p.add_argument("--redis-url", help="default: RANKER_REDIS_URL, else redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", help="key prefix; default: RANKER_REDIS_PREFIX, else ranker:fs")
    p.add_argument("--ttl-s", type=int, help="record TTL in seconds; default 30 days")
    p.add_argument("--batch-size", type=int, default=5000, help="entities per pipelined round trip")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_push_state)

    u = sub.add_parser(
        "tune", help="choose ranking weights from a goal; Pareto plot of the trade-off"
    )
    u.add_argument("--artifact", default="artifacts/default", help="version dir or its parent")
    u.add_argument("--log", help="Parquet log; default: the artifact config's")
    u.add_argument("--split", choices=["validation", "train", "all"], default="validation")
    u.add_argument("--ranking", help="the current weights; default: the artifact's own")
    u.add_argument("--out", default="runs/tune", help="output folder")
    u.add_argument("--maximize", metavar="METRIC", help="e.g. watch_time@10 (docs/tuning.md)")
    u.add_argument("--minimize", metavar="METRIC")
    u.add_argument(
        "--constraint",
        dest="constraints",
        action="append",
        default=[],
        metavar="EXPR",
        help='e.g. "likes@10>=-2%%" (relative to the current weights) or "rating@10>=3.6"',
    )
    u.add_argument("--k", type=int, default=10, help="default cut-off of the list metrics")
    u.add_argument("--formula", choices=["weighted_sum", "weighted_product"])
    u.add_argument("--heads", help="comma-separated heads that may get weight; default: all")
    u.add_argument(
        "--transform",
        dest="transforms",
        action="append",
        default=[],
        metavar="HEAD=NAME",
        help="per-head transform (identity, log1p, sqrt, log); default: the current config's",
    )
    u.add_argument("--samples", type=int, default=1500, help="random weight settings")
    u.add_argument("--refine", type=int, default=400, help="settings around the best")
    u.add_argument(
        "--holdout", type=float, default=0.3, help="share of requests kept out of the search"
    )
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--x", help="engagement axis of the plot; default watch_time@k")
    u.add_argument("--y", help="satisfaction axis of the plot; default likes@k")
    u.add_argument(
        "--as-variant",
        metavar="NAME",
        help="also append the chosen weights to --into as an A/B variant (docs/tuning.md)",
    )
    u.add_argument("--share", type=float, help="the variant's share of users, e.g. 0.1")
    u.add_argument("--into", help="the ranking config TOML the variant is added to")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=cmd_tune)

    r = sub.add_parser("report", help="one HTML page showing a trained model in pictures")
    r.add_argument("--artifact", default="artifacts/default", help="version dir or its parent")
    r.add_argument("--run-dir", help="training run folder; default: the artifact config's")
    r.add_argument("--out", help="report folder; default: <run dir>/report")
    r.add_argument("--log", help="Parquet log; default: the artifact config's")
    r.add_argument("--split", choices=["validation", "train", "all"], default="validation")
    r.add_argument(
        "--gate-records", type=int, default=5, help="last gate records the heatmap averages"
    )
    r.add_argument("--tune", help="include a `ranker tune` output folder")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser(
        "build-log",
        help="join the service's exposures with its feedback events into a training log",
    )
    b.add_argument("--exposures", required=True, help="folder (or file) of exposure Parquet")
    b.add_argument("--events", required=True, help="folder (or file) of event Parquet")
    b.add_argument("--out", required=True, help="output folder (part-*.parquet, _build-log.json)")
    b.add_argument(
        "--window",
        type=float,
        default=86400.0,
        help="attribution window after the exposure, in the log's time unit (default 86400)",
    )
    b.add_argument(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="TYPE=COLUMN[:KIND]",
        help="event type to label column; KIND flag (0/1, default), sum or value (the latest); "
        "adds to or replaces the defaults click, like, long_view, watch_seconds->watch_time:sum, "
        "rating:value",
    )
    b.add_argument("--no-default-labels", action="store_true", help="only the --label rules")
    b.add_argument("--time-column", default="timestamp", help="name of the time column written")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_build_log)

    ab = sub.add_parser(
        "ab-report", help="per-variant engagement of a joined log, with confidence intervals"
    )
    ab.add_argument("--log", required=True, help="the joined log (ranker build-log --out)")
    ab.add_argument("--by", default="variant", help="the column that splits the log")
    ab.add_argument("--control", help="the baseline group; default 'control', else the first")
    ab.add_argument("--user-key", default="user_id", help="the unit of assignment")
    ab.add_argument("--json", action="store_true", help="JSON instead of the table")
    ab.set_defaults(func=cmd_ab_report)
