"""`splitfuse bench`: the benchmark tool's command line — serve (load a server), offline (LLM.generate), plot."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from splitfuse.bench.arrivals import ARRIVAL_KINDS, ArrivalConfig, load_trace
from splitfuse.bench.metrics import FASTGEN_TARGET_RATES, Slo
from splitfuse.bench.workloads import WORKLOAD_KINDS, LengthDist, WorkloadConfig, attach_text, build_sessions

if TYPE_CHECKING:
    from splitfuse.bench.serve_run import ServeRun

EXAMPLES = """examples:
  splitfuse bench serve --base-url http://127.0.0.1:8000 --arrival closed --concurrency 8
  splitfuse bench serve --base-url http://127.0.0.1:8000 --model m --arrival poisson --sweep 1,2,4,8 \\
      --slo-ttft-ms 1000 --slo-tpot-ms 100 --goodput
  splitfuse bench offline --num-requests 64 --prompt-len normal:512 --output-len normal:128
  splitfuse bench plot a.json b.json -o compare.png
"""


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` (with serve, offline, plot) on the main CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmark a server or the offline engine",
        description="Latency and throughput benchmarks.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_subcommands(bench)
    return bench


def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="{serve,offline,plot}")
    serve = commands.add_parser("serve", help="load an OpenAI-compatible server over HTTP")
    _add_workload_args(serve)
    _add_serve_args(serve)
    _add_output_args(serve)
    serve.set_defaults(func=run_serve_command)

    offline = commands.add_parser("offline", help="throughput of LLM.generate, in-process")
    _add_workload_args(offline)
    offline.add_argument("--model", default="", help="checkpoint directory, .gguf file or built-in name "
                         "(default: smollm2-135m-instruct)")
    offline.add_argument("--dtype", default=None)
    offline.add_argument("--max-num-batched-tokens", type=int, default=None)
    offline.add_argument("--max-num-seqs", type=int, default=None)
    _add_output_args(offline)
    offline.set_defaults(func=run_offline_command)

    plot = commands.add_parser("plot", help="overlay the curves of several results files")
    plot.add_argument("files", nargs="+", help="results JSON files of `bench serve`/`bench offline`")
    plot.add_argument("-o", "--output", default="bench_plot.png", help="PNG to write")
    plot.add_argument("--labels", default=None, help="comma-separated series names (default: each file's label)")
    plot.add_argument("--title", default=None)
    plot.set_defaults(func=run_plot_command)


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=WORKLOAD_KINDS, default="synthetic")
    group.add_argument("--num-requests", type=int, default=100, help="requests per run (per sweep point)")
    group.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist("fixed", 512),
                       help="N | fixed:N | uniform:LOW:HIGH | normal:MEAN[:STD] (std 0.3×mean); "
                            "shared-prefix: tokens after the prefix; multi-turn: new tokens per turn")
    group.add_argument("--output-len", type=LengthDist.parse, default=LengthDist("fixed", 128),
                       help="output tokens, same syntax; exact (max_tokens + ignore_eos + min_tokens)")
    group.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    group.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per prefix")
    group.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per conversation")
    group.add_argument("--vocab-low", type=int, default=100, help="random prompt ids are >= this")
    group.add_argument("--vocab-high", type=int, default=1000, help="random prompt ids are < this")
    group.add_argument("--seed", type=int, default=0)


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    target.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    target.add_argument("--model", default=None,
                        help="model name sent in each request (default: the first of the server's /v1/models)")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    target.add_argument("--prompt-format", choices=("token-ids", "text"), default="token-ids",
                        help="token-ids keeps prompt lengths exact; text needs --tokenizer")
    target.add_argument("--tokenizer", default=None, help="local tokenizer directory for --prompt-format text")
    load = parser.add_argument_group("load")
    load.add_argument("--arrival", choices=ARRIVAL_KINDS, default="closed")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: concurrent clients")
    load.add_argument("--rate", type=float, default=1.0, help="poisson/gamma: requests per second")
    load.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation of gaps")
    load.add_argument("--trace", default=None, help="trace CSV/JSONL (BurstGPT columns)")
    load.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply trace gaps by this")
    load.add_argument("--sweep", type=_floats, default=None,
                      help="comma-separated concurrencies (closed) or rates (poisson/gamma)")
    load.add_argument("--duration-s", type=float, default=600.0, help="send nothing after this")
    load.add_argument("--request-timeout-s", type=float, default=300.0, help="cut off a request after this")
    load.add_argument("--no-progress", action="store_true")
    load.add_argument("--no-plot", action="store_true", help="skip the PNG")
    slo = parser.add_argument_group("SLOs")
    slo.add_argument("--slo-ttft-ms", type=float, default=None)
    slo.add_argument("--slo-tpot-ms", type=float, default=None)
    slo.add_argument("--goodput", action="store_true",
                     help="search the highest rate with >= 90%% SLO attainment (needs both SLOs)")
    slo.add_argument("--goodput-start-rate", type=float, default=1.0)
    slo.add_argument("--goodput-max-probes", type=int, default=12)
    slo.add_argument("--fluidity-prefill-deadline-ms", type=float, default=None, help="default: --slo-ttft-ms")
    slo.add_argument("--fluidity-decode-deadline-ms", type=float, default=None, help="default: --slo-tpot-ms")
    slo.add_argument("--effective-rates", type=_floats, default=list(FASTGEN_TARGET_RATES),
                     help="FastGen target token rates r (tokens/s), default 2,4,6")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default="bench_results")
    output.add_argument("--label", default=None, help="series name (default: server version or host)")


def workload_from_args(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        kind=args.workload, num_requests=args.num_requests, prompt_len=args.prompt_len,
        output_len=args.output_len, num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
        num_turns=args.num_turns, vocab_low=args.vocab_low, vocab_high=args.vocab_high, seed=args.seed)


def _command_line(args: argparse.Namespace) -> list[str]:
    return getattr(args, "command_line", None) or list(sys.argv)


def run_serve_command(args: argparse.Namespace) -> int:
    try:
        run = serve_run_from_args(args)
    except ValueError as exc:
        print(f"splitfuse bench serve: {exc}", file=sys.stderr)
        return 2
    return run.execute(_command_line(args))


def serve_run_from_args(args: argparse.Namespace) -> "ServeRun":
    """A validated ServeRun; raises ValueError naming the flag when arguments do not fit together."""
    from splitfuse.bench.client import ServerTarget, fetch_first_model
    from splitfuse.bench.serve_run import ServeRun

    if args.endpoint == "chat" and args.prompt_format != "text":
        raise ValueError("--endpoint chat sends text: add --prompt-format text --tokenizer PATH")
    if args.prompt_format == "text" and not args.tokenizer:
        raise ValueError("--prompt-format text needs --tokenizer PATH (a local directory)")
    slo = slo_from_args(args)
    if args.goodput and slo is None:
        raise ValueError("--goodput needs --slo-ttft-ms and --slo-tpot-ms")
    arrival = arrival_from_args(args)
    if args.goodput and arrival.kind == "trace":
        raise ValueError("--goodput searches a rate; use --arrival poisson or gamma")
    trace = load_trace_if_any(args)
    workload = workload_from_args(args)
    sessions = build_sessions(workload, trace)
    if args.prompt_format == "text":
        tokenizer = _load_tokenizer(args.tokenizer)
        if args.vocab_high > len(tokenizer):
            raise ValueError(f"--vocab-high {args.vocab_high} is beyond the tokenizer's {len(tokenizer)} tokens")
        sessions = attach_text(sessions, tokenizer)
    prefill_ms = args.fluidity_prefill_deadline_ms or args.slo_ttft_ms
    decode_ms = args.fluidity_decode_deadline_ms or args.slo_tpot_ms
    fluidity = (prefill_ms / 1e3, decode_ms / 1e3) if prefill_ms and decode_ms else None
    model = args.model or fetch_first_model(args.base_url)  # last: the flags are checked without a server
    return ServeRun(
        target=ServerTarget(args.base_url, model, args.endpoint, args.request_timeout_s),
        workload=workload, arrival=arrival, sessions=sessions, trace=trace,
        sweep_values=args.sweep, max_duration_s=args.duration_s, slo=slo,
        fluidity_deadlines_s=fluidity, effective_rates=list(args.effective_rates),
        goodput=args.goodput, goodput_start_rate=args.goodput_start_rate,
        goodput_max_probes=args.goodput_max_probes, output_dir=Path(args.output_dir),
        label=args.label, plot=not args.no_plot, show_progress=not args.no_progress,
        prompt_format=args.prompt_format, tokenizer=args.tokenizer,
    )


def _load_tokenizer(path: str) -> Any:
    # Local directories only: the benchmark never downloads from a model hub.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def run_offline_command(args: argparse.Namespace) -> int:
    from splitfuse.bench.offline import OfflineConfig, run_offline
    from splitfuse.models.sources import DEFAULT_MODEL_NAME
    from splitfuse.bench.report import build_report, print_table, result_stem, save_report

    workload = workload_from_args(args)
    config = OfflineConfig(model=args.model, dtype=args.dtype,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    point = run_offline(config, build_sessions(workload))
    label = args.label or Path(config.model or DEFAULT_MODEL_NAME).name
    report = build_report("offline", label, {"workload": workload.to_dict(), "engine": asdict(config)},
                          server=None, points=[point], command=_command_line(args))
    path = save_report(report, Path(args.output_dir) / f"{result_stem(label, 'offline')}.json")
    print_table(report)
    print(f"results: {path}")
    return 0


def run_plot_command(args: argparse.Namespace) -> int:
    from splitfuse.bench.plots import plot_reports
    from splitfuse.bench.report import load_report

    reports = [load_report(path) for path in args.files]
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(reports):
        print(f"--labels names {len(labels)} series for {len(reports)} files", file=sys.stderr)
        return 2
    print(f"plot: {plot_reports(reports, args.output, labels, args.title)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m splitfuse.bench {serve,offline,plot} ...``"""
    parser = argparse.ArgumentParser(prog="python -m splitfuse.bench", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_subcommands(parser)
    args = parser.parse_args(argv)
    if argv is not None:
        args.command_line = ["python", "-m", "splitfuse.bench", *argv]
    return args.func(args)


def load_trace_if_any(args: argparse.Namespace) -> Optional[list]:
    """The trace entries when --arrival trace (or --trace) is given; they also set the lengths."""
    if args.arrival == "trace" or args.trace:
        if not args.trace:
            raise ValueError("--arrival trace needs --trace PATH")
        return load_trace(args.trace)
    return None


def slo_from_args(args: argparse.Namespace) -> Optional[Slo]:
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
        return None
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        raise ValueError("give both --slo-ttft-ms and --slo-tpot-ms")
    return Slo(ttft_s=args.slo_ttft_ms / 1e3, tpot_s=args.slo_tpot_ms / 1e3)


def arrival_from_args(args: argparse.Namespace) -> ArrivalConfig:
    return ArrivalConfig(kind=args.arrival, concurrency=args.concurrency, rate=args.rate, cv=args.cv,
                         trace_path=args.trace, trace_time_scale=args.trace_time_scale)
