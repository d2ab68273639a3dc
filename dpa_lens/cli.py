"""Command line: ``dpa-lens demo``, ``dpa-lens explain``, ``dpa-lens attribute`` and ``dpa-lens methods``.

    dpa-lens demo --out report.html
    dpa-lens explain --model smollm2-135m --prompt "When Mary and John went to the store, John gave a drink to" \\
        --target " Mary" --contrast " John" --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --methods dpa,dla,atp,activation_patching --out report.html
    dpa-lens attribute --model smollm2-135m --method dpa --data ioi.jsonl --out runs/ioi --batch-size 8
    torchrun --nproc_per_node 2 -m dpa_lens attribute --method dpa_edges --data ioi.jsonl --out runs/ioi_edges
    dpa-lens methods

``attribute`` runs one method over a dataset of JSON-line records (`dpa_lens.attribute_dataset`),
keeping each batch's results as a Parquet shard in ``--out``; the same command resumes a killed run.
``demo`` and ``explain`` print the top tokens, heads and neurons by DPA (or the first method) and
write a self-contained HTML report (plotly.js embedded, nothing fetched) when ``--out`` is given.
Every argument is checked before the model is loaded; a bad one is a one-line error (exit 2). The
report is written once the work is done, atomically: a run that fails (exit 1) or is interrupted
(Ctrl-C: ``interrupted``, exit 130) leaves an earlier file as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def summary(report, top: int) -> str:
    """The report's headline and the first method's top units (or edges) by absolute score, as text."""
    from dpa_lens.results import Circuit

    name = next(iter(report.attributions))
    attr = report.attributions[name]
    value = "" if attr.target_value is None else f" = {float(attr.target_value[0]):.4f}"
    lines = [
        f"model      {report.model_name}",
        f"prompt     {report.prompt!r}",
        f"predicted  {report.predicted!r}",
        f"explaining {report.target_label}{value}",
    ]
    if isinstance(attr, Circuit):
        lines += ["", f"Top {top} edges ({name}, by |score|)"]
        for _, row in attr.top(top).iterrows():
            lines.append(f"  {row['writer']:<8} -> {row['reader']:<8} [{row['path']}]  {row['score']:+9.4f}")
        return "\n".join(lines)
    if attr.has("tokens"):
        lines += ["", f"Top {top} tokens ({name}, by |score|)"]
        for _, row in attr.top(top, "tokens", absolute=True).iterrows():
            lines.append(f"  {row['pos']:>4}  {row['token']!r:<16} {row['score']:+9.4f}")
    if attr.has("heads"):
        lines += ["", f"Top {top} heads ({name}, summed over positions, by |score|)"]
        for _, row in attr.top(top, "heads", sum_positions=True, absolute=True).iterrows():
            lines.append(f"  {row['unit']:<8} {row['score']:+9.4f}")
    if attr.neurons is not None:
        lines += ["", f"Top {top} MLP neurons ({name}, layer, neuron @ position, by |score|)"]
        for _, row in attr.top(top, "neurons", absolute=True).iterrows():
            lines.append(f"  {row['unit']:<16} {row['token']!r:<14} {row['score']:+9.4f}")
    return "\n".join(lines)


def explain(model_name: str, prompt: str, target: str, contrast: str | None, corrupted: str | None,
            methods: Sequence[str], out: Path | None, top: int) -> int:
    import dpa_lens
    from dpa_lens.files import write_text_atomic
    from dpa_lens.report import build_report

    started = time.perf_counter()
    print(f"loading {model_name} ...", file=sys.stderr, flush=True)
    model = dpa_lens.load_model(model_name)
    report = build_report(model, prompt, (target, contrast) if contrast else target, corrupted=corrupted,
                          methods=methods, model_name=model_name)
    print(summary(report, top))
    if out is not None:
        write_text_atomic(out, report.html(top=top), what="the report")
        print(f"\nreport written to {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    print(f"done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_out(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """A file that can be written in an existing folder, checked now: the report is written after all the work."""
    from dpa_lens.errors import InputError
    from dpa_lens.files import check_writable

    if out is None:
        return
    try:
        check_writable(out.expanduser().resolve(), what="the report")
    except InputError as err:
        parser.error(f"--out: {err}")


def _check_model(parser: argparse.ArgumentParser, name: str) -> None:
    """A bundled model whose package is installed, a folder with a ``config.json``, or a hub name (cached, when offline)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    from dpa_lens.errors import ModelNotAvailableError
    from dpa_lens.models.bundled import BUNDLED_MODELS, require_installed

    if name.strip().lower() in BUNDLED_MODELS:
        try:
            require_installed(name.strip().lower())
        except ModelNotAvailableError as err:
            parser.error(f"--model {name!r}: {err}")
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            parser.error(f"--model {name!r}: the folder has no config.json; pass a folder written by save_pretrained")
        return
    try:
        validate_repo_id(name)
    except ValueError:
        parser.error(f"--model {name!r}: not a bundled model ({', '.join(BUNDLED_MODELS)}), a model folder, or a "
                     "HuggingFace name such as 'HuggingFaceTB/SmolLM2-135M'")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        parser.error(f"--model {name!r}: HF_HUB_OFFLINE is set and it is not in the local HuggingFace cache; "
                     f"unset HF_HUB_OFFLINE to download it, or use a bundled model ({', '.join(BUNDLED_MODELS)})")


def _check_texts(parser: argparse.ArgumentParser, args: argparse.Namespace, methods: Sequence[str]) -> None:
    """What can be told of the prompts and tokens without the tokenizer."""
    from dpa_lens.methods.registry import get_method

    for flag in ("prompt", "target", "contrast", "corrupted"):
        text = getattr(args, flag)
        if text is not None and (text == "" if flag in ("target", "contrast") else not text.strip()):  # ' ' is a token
            parser.error(f"--{flag} is empty")
    if args.contrast == args.target:
        parser.error(f"--contrast {args.contrast!r} is the same token as --target: the logit difference is 0; pass another token")
    if args.corrupted is not None:
        if args.corrupted == args.prompt:
            parser.error("--corrupted is the prompt itself: every patching score would be 0; pass a prompt that changes the answer")
        if not any(get_method(m).input == "pair" for m in methods):
            parser.error(f"--corrupted is given but none of the methods ({', '.join(methods)}) compares with it; add atp or "
                         "activation_patching to --methods, or drop --corrupted")


def _methods(parser: argparse.ArgumentParser, text: str | None, corrupted: str | None) -> list[str]:
    """The methods asked for, checked against the registry (defaults skip pair methods without --corrupted)."""
    from dpa_lens.methods.registry import available_methods, get_method
    from dpa_lens.report import DEFAULT_METHODS

    if text is None:
        return list(DEFAULT_METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        parser.error("--methods is empty")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        parser.error(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; choose among: {', '.join(available_methods())}")
    pairs = [m for m in methods if get_method(m).input == "pair"]
    if pairs and corrupted is None:
        parser.error(f"{', '.join(pairs)} compare{'s' if len(pairs) == 1 else ''} a clean and a corrupted prompt: add --corrupted '...'")
    return methods


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE``: the value read as JSON (``true``, ``3``, ``[1, 2]``), else as a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _check_attribute(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Everything ``attribute`` can check before loading the model: the method and its options, the records
    (read whole: their structure and ids), the output folder (empty, or a run of the same settings)."""
    from dpa_lens.errors import InputError
    from dpa_lens.methods.registry import available_methods, checked_options, get_method
    from dpa_lens.runs.records import read_records
    from dpa_lens.runs.runner import run_identity
    from dpa_lens.runs.store import Store

    if args.method not in available_methods():
        parser.error(f"--method {args.method!r}: unknown; choose among: {', '.join(available_methods())}")
    options = dict(args.option or [])
    try:
        checked_options(get_method(args.method), options)
    except InputError as err:
        parser.error(f"--option: {err}")
    try:
        read_records(args.data)
    except InputError as err:
        parser.error(f"--data: {err}")
    try:
        Store(args.out).check(run_identity(args.method, options, args.position, ""), keys=("method", "options", "position"))
    except InputError as err:
        parser.error(f"--out: {err}")
    return options


def attribute(args: argparse.Namespace, options: dict) -> int:
    import torch

    import dpa_lens
    from dpa_lens.runs.distributed import Processes

    started = time.perf_counter()
    procs = Processes.start()
    device = args.device or (f"cuda:{procs.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if procs.rank == 0:
        print(f"loading {args.model} on {device} ({procs.world} process{'es' if procs.world > 1 else ''}) ...", file=sys.stderr, flush=True)
    try:
        model = dpa_lens.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
        res = dpa_lens.attribute_dataset(model, args.method, args.data, args.out, batch_size=args.batch_size,
                                         position=args.position, progress=not args.no_progress, **options)
    finally:
        procs.stop()
    if procs.rank == 0:
        print(f"{len(res)} records written to {args.out} ({len(res.skipped)} skipped) in {time.perf_counter() - started:.1f}s; "
              f"read them with dpa_lens.load_results({str(args.out)!r})")
        for skip in res.skipped[:10]:
            print(f"  skipped {skip['id']}: {skip['reason']}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dpa_lens.errors import DpaLensError
    from dpa_lens.methods.registry import available_methods, method_table
    from dpa_lens.report import DEFAULT_METHODS

    parser = argparse.ArgumentParser(prog="dpa-lens", description="Dual Path Attribution for TransformerLens models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the classic IOI example with the bundled SmolLM2-135M, offline")
    demo.add_argument("--out", type=Path, default=Path("report.html"), help="HTML report to write (default report.html)")
    demo.add_argument("--top", type=_positive, default=10)
    ex = sub.add_parser("explain", help="explain one prompt's answer")
    ex.add_argument("--model", default="smollm2-135m",
                    help="a bundled model (smollm2-135m, gemma3-270m: offline), a HuggingFace name, or a folder written by save_pretrained")
    ex.add_argument("--prompt", required=True)
    ex.add_argument("--target", required=True, help="the answer token, e.g. ' Mary' (mind the leading space)")
    ex.add_argument("--contrast", default=None, help="explain the target's logit minus this token's, e.g. ' John'")
    ex.add_argument("--corrupted", default=None, help="a corrupted prompt of the same length, for AtP and patching")
    ex.add_argument("--methods", default=None,
                    help=f"comma-separated, among: {', '.join(available_methods())} (default: {','.join(DEFAULT_METHODS)})")
    ex.add_argument("--out", type=Path, default=None, help="write an HTML report here")
    ex.add_argument("--top", type=_positive, default=10)
    at = sub.add_parser("attribute", help="run one method over a dataset of records (JSON lines), resumably",
                        description="Run one method over every record of a JSON-lines file; results go to --out as Parquet "
                                    "shards (read them with dpa_lens.load_results). The same command resumes a killed run. "
                                    "Under torchrun (torchrun --nproc_per_node N -m dpa_lens attribute ...) the records are "
                                    "divided among the processes.")
    at.add_argument("--model", default="smollm2-135m", help="as for explain")
    at.add_argument("--method", required=True, help=f"one of: {', '.join(available_methods())}")
    at.add_argument("--data", type=Path, required=True,
                    help='records, one JSON object a line: {"id": ..., "prompt": ..., "target": " Mary" or [" Mary", " John"], '
                         '"corrupted": ...}')
    at.add_argument("--out", type=Path, required=True, help="the run's folder (made if missing; an earlier run of the same settings resumes)")
    at.add_argument("--batch-size", type=_positive, default=8)
    at.add_argument("--position", type=int, default=-1, help="the answer position of every record (default -1: its last token)")
    at.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                    help="a method option, repeatable (the value is read as JSON: --option flow=true --option neurons=null)")
    at.add_argument("--device", default=None, help="default: the process's GPU (cuda:LOCAL_RANK) when there is one, else cpu")
    at.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    at.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("methods", help="list the attribution methods and what each takes")
    args = parser.parse_args(argv)
    if args.command == "methods":
        for row in method_table():
            print(f"{row['method']:<22} {row['input']:<7} {row['returns']:<6} {row['scores']:<24} {row['summary']}")
        return 0
    if args.command == "attribute":
        options = _check_attribute(parser, args)
        _check_model(parser, args.model)
        try:
            return attribute(args, options)
        except KeyboardInterrupt:
            print("interrupted: the records written are kept; run the same command to go on", file=sys.stderr)
            return 130
        except (DpaLensError, OSError) as err:
            print(f"dpa-lens: error: {err}", file=sys.stderr)
            return 1
    _check_out(parser, args.out)
    if args.command == "demo":
        run = ("smollm2-135m", IOI_PROMPT, " Mary", " John", IOI_CORRUPTED, DEFAULT_METHODS)
    else:
        methods = _methods(parser, args.methods, args.corrupted)
        _check_texts(parser, args, methods)
        run = (args.model, args.prompt, args.target, args.contrast, args.corrupted, methods)
    _check_model(parser, run[0])
    try:
        return explain(*run, args.out, args.top)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DpaLensError, OSError) as err:  # a model not found, a target of two tokens, a full disk
        print(f"dpa-lens: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
