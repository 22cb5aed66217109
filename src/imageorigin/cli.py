"""Command line: a thin argparse layer over the package's functions (the
arguments are :mod:`imageorigin.cli_args`, the output formats :mod:`imageorigin.output`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import fields

from . import backbones, report
from .cli_args import GALLERY_MAX, parser as make_parser
from .crossval import crossval, to_markdown
from .data import DataFolderError, describe_preprocessing
from .engine import check_outcome
from .evaluate import evaluate
from .export import export_onnx, export_seed
from .images import find_images
from .model import CheckpointError, load
from .output import common_root, declared_line, output_file, table_header, verdict_cuts, write_predictions
from .predict import current_engine, precision_reason, predict
from .train import TrainConfig, train

# Errors that mean "the user asked for something that cannot be done": a message, not a traceback.
USER_ERRORS = (CheckpointError, DataFolderError, backbones.BackboneWeightsError, ValueError,
               FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imageorigin`` command; returns the exit status."""
    parser = make_parser(HANDLERS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="imageorigin: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"imageorigin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imageorigin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`imageorigin predict ... | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush has nowhere to fail
        return 141  # 128 + SIGPIPE, as a shell tool killed by the closed pipe reports


def _config(args) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _train(args) -> int:
    if args.resume:
        if args.data_dir or args.out:
            raise ValueError("--resume RUN_DIR continues that run with its own data and settings: "
                             "give no DATA_DIR or --out")
        from .train import resume

        model = resume(args.resume, progress=not args.quiet, ddp=args.ddp)
        args.out = args.resume
    else:
        if not args.data_dir or not args.out:
            raise ValueError("train needs DATA_DIR... and --out RUN_DIR (or --resume RUN_DIR)")
        model = train(args.data_dir, args.out, _config(args), val=args.val, progress=not args.quiet,
                      manifest=args.manifest, ddp=args.ddp)
    m = model.info["metrics"]
    print(f"val accuracy {m['val_accuracy']:.4f}  val loss {m['val_loss']:.4f}  "
          f"({model.info['training']['wall_seconds']} s); wrote {args.out}/model.safetensors")
    return 0


def _crossval(args) -> int:
    result = crossval(args.data_dir, args.manifest, args.out, _config(args), reference=args.reference,
                      sources=args.sources, progress=not args.quiet, folds=args.folds,
                      group_by=args.group_by, only=args.only, resume=args.resume,
                      fold_seed=args.fold_seed, folds_from=args.folds_from)
    print(to_markdown(result))
    print(f"wrote {args.out}/crossval.json and {args.out}/crossval.md")
    return 0


def _evaluate(args) -> int:
    result = evaluate(load(args.model), args.data_dir, args.out, manifest=args.manifest,
                      robustness=args.robustness, samples=args.samples, batch_size=args.batch_size,
                      num_workers=args.num_workers, progress=not args.quiet, engine=args.engine,
                      precision=args.precision)
    rows = report.headline(result)  # the report's headline, on the terminal too
    width = max(len(m) for m, _ in rows)
    print(f"{result['n_images']} images, {len(result['errors'])} unreadable")
    for measure, value in rows:
        print(f"{measure.ljust(width)}  {value}")
    for err in result["errors"]:
        print(f"unreadable: {err}", file=sys.stderr)
    print(f"wrote {args.out}/metrics.json and {args.out}/report.md")
    return 0


def _predict(args) -> int:
    model = load(args.model)
    files = list(find_images(args.paths))
    if not files:
        raise ValueError(f"no image files found in {' '.join(args.paths)}")
    if not args.quiet:
        engine = current_engine(model, args.engine, args.precision)
        print(f"imageorigin: {len(files)} images, engine {engine}", file=sys.stderr)
    preds = predict(model, files, batch_size=args.batch_size, num_workers=args.num_workers,
                    progress=not args.quiet and sys.stderr.isatty(), engine=args.engine,
                    precision=args.precision, threshold=args.threshold, evidence=True)
    counts = dict.fromkeys(("likely_ai", "uncertain", "likely_human", "error"), 0)
    declared = {}  # provenance summary -> files, beside the pixel verdicts
    shown = []
    with output_file(args.out) as out:
        header = lambda digits: table_header(model, args.threshold, digits)  # noqa: E731
        cuts = verdict_cuts(model, args.threshold)
        for p in write_predictions(preds, model.labels, args.format, out, args.evidence, header, cuts,
                                   root=common_root(files)):
            key = "error" if p.error else p.verdict
            counts[key] = counts.get(key, 0) + 1
            kind = (p.provenance or {}).get("summary", "none")
            declared[kind] = declared.get(kind, 0) + (kind != "none")
            if args.gallery and len(shown) < GALLERY_MAX and not p.error:
                shown.append(p)
        summary = (f"{len(files)} images: {counts['likely_ai']} flagged as AI (likely AI), "
                   f"{counts['uncertain']} uncertain, {counts['likely_human']} likely human, "
                   f"{counts['error']} errors")
        said = declared_line(declared)
        if args.format == "table":
            out.write(summary + "\n" + (said + "\n" if said else ""))
    if args.gallery:
        report.prediction_gallery(shown, args.gallery)
    check = model.info.get("precision_check") or {}
    if "checked_on" in check and not args.quiet:  # a model that had no stored check: say what was chosen
        cost = check.get("int8", {}).get("quantise_seconds")
        cost = f"; int8 calibration took {cost:.1f} s, once: its engine is cached" if cost else ""
        print(f"imageorigin: precision {check_outcome(check)} (checked on {check['checked_on']}{cost}); "
              f"ran on {current_engine(model, args.engine, args.precision)}", file=sys.stderr)
    elif args.precision and not args.quiet:  # forced: the engine line above ran before a forced int8 existed
        print(f"imageorigin: precision {args.precision} forced, not checked; "
              f"ran on {current_engine(model, args.engine, args.precision)}", file=sys.stderr)
    if (args.format != "table" or args.out) and not args.quiet:
        print(f"imageorigin: {summary}" + (f"\nimageorigin: {said}" if said else ""), file=sys.stderr)
    if counts["error"]:  # said even with --quiet: the exit status alone does not name the count
        print(f"imageorigin: {counts['error']} of {len(files)} files could not be read", file=sys.stderr)
    return 1 if counts["error"] else 0


def _export(args) -> int:
    if args.out.endswith(".onnx"):
        path = export_onnx(load(args.model), args.out)
    elif args.out.endswith(".pth"):
        path = export_seed(load(args.model), args.out)
    else:
        raise ValueError(f"{args.out}: name the output .onnx (ONNX) or .pth (the seed's layout)")
    print(f"wrote {path}")
    return 0


def _scan(args) -> int:
    from .scan import scan

    s = scan(args.paths, args.db, args.model, out=args.out, evidence=args.evidence, batch_size=args.batch_size,
             commit_every=args.commit_every, progress=not args.quiet and sys.stderr.isatty(),
             ray_address=args.ray)
    v = s["verdicts"]
    print(f"{s['files']} files in {args.db or args.out} for this model ({s['scanned']} scanned now, {s['skipped']} "
          f"already there): {v.get('likely_ai', 0)} likely AI ({s['flagged_share']:.1%}), "
          f"{v.get('uncertain', 0)} uncertain, {v.get('likely_human', 0)} likely human, {s['errors']} errors; "
          "labels " + ", ".join(f"{k} {n}" for k, n in sorted(s["labels"].items(), key=lambda kv: str(kv[0]))))
    return 0


def _results(args) -> int:
    from .scan import export

    if args.format == "parquet" and not args.out:
        raise ValueError("parquet needs --out FILE")
    n = export(args.db, args.out or sys.stdout, args.format, args.where)
    if args.out:
        print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


def _explain(args) -> int:
    from pathlib import Path

    model = load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for p in predict(model, args.images):
        if p.error:
            print(f"imageorigin: {p.error}", file=sys.stderr)
            failed += 1
            continue
        if not p.patches:
            print(f"imageorigin: {p.path}: this model scores one crop: no patch map", file=sys.stderr)
            continue
        path = report.overlay(p.path, p, out / (Path(p.path).stem + ".overlay.png"))
        print(f"{p.path}: {p.verdict}, p_ai {p.p_ai:.3f}; wrote {path}")
    return 1 if failed else 0


def _serve(args) -> int:
    import uvicorn

    from .service import Limits, check_bind, create_app, load_api_keys

    keys = load_api_keys(args.api_key, args.api_key_file)
    check_bind(args.host, keys, args.insecure_bind)
    limits = Limits(**{k: getattr(args, k) for k in ("max_request_bytes", "max_files", "max_batch",
                                                     "max_wait_ms", "max_queue", "rate_per_minute",
                                                     "rate_burst", "body_timeout_s", "request_timeout_s")
                       if getattr(args, k) is not None})
    # One process, one model: uvicorn's own workers would each load it and fight for the cores.
    # limit_concurrency answers 503 past that many open connections and tasks;
    # timeout_keep_alive drops idle connections. uvicorn trusts X-Forwarded-For
    # from 127.0.0.1 unless told otherwise, which would let any local client
    # forge its address past the rate limit: only the proxies named are trusted.
    uvicorn.run(create_app(args.model, limits, keys, store=args.store, keep_images=args.keep_images), host=args.host, port=args.port, log_level="info",
                access_log=False, limit_concurrency=1024, timeout_keep_alive=5,
                proxy_headers=bool(args.forwarded_allow_ips), forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def _adapt(args) -> int:
    from .adapt import adapt, gate, gate_table

    record = adapt(args.model, args.feedback, args.out, replay=args.replay, epochs=args.epochs,
                   replay_per_class=args.replay_per_class, progress=not args.quiet)
    print(f"candidate {record['candidate']} (id {record['candidate_id'][:12]}): learned from "
          f"{len(record['trained_on'])} reviewed images, {len(record['held_out'])} held out for the gate, "
          f"in {record['seconds']} s", file=sys.stderr)
    if not args.reference:
        print("not gated: give --reference DIR (or run imageorigin gate) before deploying it", file=sys.stderr)
        return 0
    result = gate(record["candidate"], args.model, args.reference)
    print(gate_table(result))
    return 0 if result["accepted"] else 1


def _gate(args) -> int:
    from .adapt import gate, gate_table

    result = gate(args.candidate, args.current, args.reference)
    print(gate_table(result))
    return 0 if result["accepted"] else 1


def _info(args) -> int:
    model = load(args.model)
    # What runs here, read back from the compiled engine (bf16 stored but no bf16
    # on this CPU runs fp32); the stored check says why the model asks for it.
    run = current_engine(model)
    meta = {**model.describe(), "engine_here": str(run), "precision_here": precision_reason(model, run)}
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print("\n".join(_summary(model, meta, args.model)))
    return 0


def _summary(model, meta: dict, name: str) -> list[str]:
    """A readable account of a model: what it tells apart, how it reads an image, how it did."""
    info = meta.get("info") or {}
    t, m = info.get("training", {}), info.get("metrics", {})
    lines = [f"model      {name}",
             f"backbone   {meta['backbone']['name'] if 'backbone' in meta else '?'}"
             + (f", {t.get('recipe')}" if t.get("recipe") else ""),
             "classes    " + ", ".join(f"{l} ({model.display_names.get(l, l)})" for l in model.labels),
             f"human      {model.human_label or 'none: no p_ai, threshold or verdict'}",
             f"reads      {describe_preprocessing(model.preprocessing)}"]
    if model.threshold is not None:
        bands = model.bands or {}
        lines.append(f"verdict    likely AI at p_ai >= {model.threshold:.4f}"
                     + (f", likely human at p_ai <= {bands['likely_human']:.4f}, uncertain between"
                        if bands.get("likely_human") is not None else ", likely human below"))
    lines.append(f"calibrated temperature {model.temperature:.3f}")
    lines += [f"runs in    {meta['engine_here']} on this machine", f"precision  {meta['precision_here']}"]
    if m:
        lines.append(f"validation accuracy {m.get('val_accuracy', float('nan')):.4f}, loss "
                     f"{m.get('val_loss', float('nan')):.4f}"
                     + (f" (epoch {m['best_epoch']} of {m['epochs']}, the best kept)" if m.get("best_epoch")
                        else f" (after {m.get('epochs')} epochs)"))
    if t.get("train_counts"):
        lines.append("trained on " + ", ".join(f"{k} {v}" for k, v in t["train_counts"].items())
                     + f" images from {t.get('data_dir')}")
    if info.get("sources"):
        lines.append(f"sources    {len(info['sources'])} (see --json)")
    for w in info.get("warnings", []):
        lines.append(f"warning    {w}")
    lines.append("(--json for everything stored in the model)")
    return lines


def _audit(args) -> int:
    from .audit import audit, console_lines, summary_line, to_markdown, write_outputs

    result = audit(args.data_dir, manifest=args.manifest, progress=not args.quiet and sys.stderr.isatty())
    if args.out is None:
        print(to_markdown(result))
        return 0
    paths = write_outputs(result, args.out)
    print(f"{summary_line(result)}; wrote {', '.join(map(str, paths))}")
    for line in console_lines(result):
        print(line)
    return 0



# What each sub-command runs (its arguments: cli_args.parser).
HANDLERS = {"train": _train, "crossval": _crossval, "evaluate": _evaluate, "predict": _predict,
            "export": _export, "scan": _scan, "results": _results, "explain": _explain, "serve": _serve,
            "info": _info, "audit": _audit, "adapt": _adapt, "gate": _gate}


if __name__ == "__main__":
    sys.exit(main())
