"""Command line: ``dpa-lens demo``, ``dpa-lens explain`` and ``dpa-lens methods``.

    dpa-lens demo --out report.html
    dpa-lens explain --model smollm2-135m --prompt "When Mary and John went to the store, John gave a drink to" \\
        --target " Mary" --contrast " John" --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --methods dpa,dla,atp,activation_patching --out report.html
    dpa-lens methods

``demo`` and ``explain`` print the top tokens, heads and neurons by DPA (or the first method) and
write a self-contained HTML report (plotly.js embedded, nothing fetched) when ``--out`` is given.
Every argument is checked before the model is loaded; a bad one is a one-line error.
"""

from __future__ import annotations

import argparse
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
    if out is not None and not out.expanduser().resolve().parent.is_dir():
        parser.error(f"--out {out}: the folder {out.expanduser().resolve().parent} does not exist")


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


def main(argv: Sequence[str] | None = None) -> int:
    from dpa_lens.methods.registry import available_methods, method_table
    from dpa_lens.report import DEFAULT_METHODS

    parser = argparse.ArgumentParser(prog="dpa-lens", description="Dual Path Attribution for TransformerLens models")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the classic IOI example with the bundled SmolLM2-135M, offline")
    demo.add_argument("--out", type=Path, default=Path("report.html"), help="HTML report to write (default report.html)")
    demo.add_argument("--top", type=_positive, default=10)
    ex = sub.add_parser("explain", help="explain one prompt's answer")
    ex.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (offline) or a HuggingFace model name")
    ex.add_argument("--prompt", required=True)
    ex.add_argument("--target", required=True, help="the answer token, e.g. ' Mary' (mind the leading space)")
    ex.add_argument("--contrast", default=None, help="explain the target's logit minus this token's, e.g. ' John'")
    ex.add_argument("--corrupted", default=None, help="a corrupted prompt of the same length, for AtP and patching")
    ex.add_argument("--methods", default=None,
                    help=f"comma-separated, among: {', '.join(available_methods())} (default: {','.join(DEFAULT_METHODS)})")
    ex.add_argument("--out", type=Path, default=None, help="write an HTML report here")
    ex.add_argument("--top", type=_positive, default=10)
    sub.add_parser("methods", help="list the attribution methods and what each takes")
    args = parser.parse_args(argv)
    if args.command == "methods":
        for row in method_table():
            print(f"{row['method']:<22} {row['input']:<7} {row['returns']:<6} {row['scores']:<24} {row['summary']}")
        return 0
    _check_out(parser, args.out)
    if args.command == "demo":
        return explain("smollm2-135m", IOI_PROMPT, " Mary", " John", IOI_CORRUPTED, DEFAULT_METHODS, args.out, args.top)
    methods = _methods(parser, args.methods, args.corrupted)
    return explain(args.model, args.prompt, args.target, args.contrast, args.corrupted, methods, args.out, args.top)


if __name__ == "__main__":
    raise SystemExit(main())
