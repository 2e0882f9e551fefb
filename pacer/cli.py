"""The `pacer` command line: `pacer serve` (OpenAI server), `pacer bench` (load generator), `pacer sim`
(the same workloads in virtual time), `pacer profile` (latency model), `pacer generate`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pacer.config import (
    CacheConfig,
    ClusterConfig,
    LatencyConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
    add_config_flags,
    config_from_args,
    engine_config_from_args,
)
from pacer.extras import MissingExtra
from pacer.request import SamplingParams
from pacer.scheduling import SCHEDULERS
from pacer.scheduling.router import ROUTERS

if TYPE_CHECKING:
    from pacer.bench.metrics import SLOTargets


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default unless its help already explains it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ModelConfig)
    add_config_flags(parser, CacheConfig)
    add_config_flags(parser, SchedulerConfig, choices={"scheduler": sorted(SCHEDULERS)})
    add_config_flags(parser, LatencyConfig)
    add_config_flags(parser, SpeculativeConfig)


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def generate(args: argparse.Namespace) -> int:
    from pacer.llm import LLM

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("pacer generate: give --prompt TEXT (repeatable) or prompts on stdin, one per line", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    llm = LLM(config=engine_config_from_args(args))
    start = time.perf_counter()
    if args.raw:
        results = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    else:
        results = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - start
    for prompt, result in zip(prompts, results):
        print(f"--- {prompt!r} ({result.finish_reason.value}, {len(result.token_ids)} tokens, "
              f"TTFT {result.ttft_s * 1e3:.0f} ms)")
        print(result.text)
    num_tokens = sum(len(r.token_ids) for r in results)
    print(f"--- {len(results)} requests, {num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tok/s",
          file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    from pacer.server.launch import serve

    return serve(engine_config_from_args(args), config_from_args(ServerConfig, args),
                 config_from_args(ClusterConfig, args))


def profile(args: argparse.Namespace) -> int:
    """Measure the latency model of this model on this machine and save it where `pacer serve` looks."""
    from tqdm import tqdm

    from pacer.engine.builder import build_engine
    from pacer.engine.profile import QUICK_GRID, ProfileGrid, default_profile_path, profile_engine

    config = engine_config_from_args(args)
    # the profiled engine itself needs no latency model; any policy will do
    engine, _ = build_engine(replace(config, scheduler=replace(config.scheduler, scheduler="sarathi"),
                                     latency=replace(config.latency, latency_profile="none")))
    grid = QUICK_GRID if args.quick else ProfileGrid()
    with tqdm(desc="profiling", unit="shape") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        model = profile_engine(engine, config.model, grid, progress)
    out = args.out or default_profile_path(model.key)
    model.save(out)
    error = model.fit_error
    print(f"{model.key['model']} ({model.key['family']}): {model.key['num_shapes']} shapes in {model.key['profile_s']} s; fit error p50 {error['p50']:.1%}, "
          f"p90 {error['p90']:.1%}, max {error['max']:.1%}; saved {out}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from pacer.bench.client import ClientConfig
    from pacer.bench.plots import require_matplotlib
    from pacer.bench.run import run_bench, run_capacity, run_compare
    from pacer.bench.workload import WorkloadConfig

    if args.plots is not None:
        require_matplotlib()
    slo = _slo(args)
    workload, client = config_from_args(WorkloadConfig, args), config_from_args(ClientConfig, args)
    if args.bench_command == "compare":
        configs = _compare_configs(args)
        run_compare(workload, client, slo, args.tokenizer, args.out, configs, args.plots)
        return 0
    if args.bench_command == "capacity":
        run_capacity(workload, client, slo, args.tokenizer, args.out, args.condition, args.min_rate, args.max_rate,
                     args.tolerance, args.max_trials, args.plots)
        return 0
    summary = run_bench(workload, client, slo, args.tokenizer, args.out, args.plots)
    return 0 if summary.num_completed else 1


def bench_suite(args: argparse.Namespace) -> int:
    from pacer.bench.suite import load_suite, run_suite
    from pacer.model.weights import load_tokenizer, resolve_model_path

    suite = load_suite(args.suite)
    if args.repeats is not None:
        suite = replace(suite, repeats=args.repeats)
    servers = args.servers.split(",") if args.servers else None
    workloads = args.workloads.split(",") if args.workloads else None
    for name, known in ((servers, suite.servers), (workloads, suite.workloads)):
        unknown = sorted(set(name or ()) - set(known))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not in {args.suite} (it has {', '.join(known)})")
    tokenizer = load_tokenizer(resolve_model_path(suite.tokenizer_model))
    run_suite(suite, args.out, tokenizer, servers, workloads)
    return 0


def sim(args: argparse.Namespace) -> int:
    from pacer.bench.plots import require_matplotlib
    from pacer.bench.workload import WorkloadConfig
    from pacer.sim.run import SimConfig, run_sim, run_sim_capacity, run_sim_compare

    if args.plots is not None:
        require_matplotlib()
    slo = _slo(args)
    workload = config_from_args(WorkloadConfig, args)
    simulated, scheduler = config_from_args(SimConfig, args), config_from_args(SchedulerConfig, args)
    if args.sim_command == "compare":
        run_sim_compare(workload, _sim_configs(args), slo, args.out, args.plots)
        return 0
    if args.sim_command == "capacity":
        run_sim_capacity(workload, simulated, scheduler, slo, args.out, args.condition, args.min_rate,
                         args.max_rate, args.tolerance, args.max_trials, args.plots)
        return 0
    summary = run_sim(workload, simulated, scheduler, slo, args.out, args.plots)
    return 0 if summary.num_completed else 1


def _sim_configs(args: argparse.Namespace) -> dict[str, tuple]:
    """--schedulers and --config NAME=FLAGS (sim and scheduler flags over the command's own) -> {name: configs}."""
    from pacer.sim.run import SimConfig

    parser = argparse.ArgumentParser(prog="--config", add_help=False, exit_on_error=False)
    _sim_engine_flags(parser)
    parser.set_defaults(**{k: v for k, v in vars(args).items()})
    flags = {name: ["--scheduler", name] for name in (args.schedulers or "").split(",") if name}
    flags |= _named(args.config, "--config")
    if not flags:
        raise ValueError("pacer sim compare needs --schedulers or --config NAME=FLAGS")
    configs = {}
    for name, items in flags.items():
        try:
            parsed, unknown = parser.parse_known_args(items)
        except argparse.ArgumentError as error:
            raise ValueError(f"--config {name}: {error}") from None
        if unknown:
            raise ValueError(f"--config {name}: unknown flags {' '.join(unknown)}")
        configs[name] = (config_from_args(SimConfig, parsed), config_from_args(SchedulerConfig, parsed))
    return configs


def _sim_engine_flags(parser: argparse.ArgumentParser) -> None:
    from pacer.sim.run import ROUTER_CHOICES, SimConfig

    add_config_flags(parser, SimConfig, choices={"router": ROUTER_CHOICES})
    add_config_flags(parser, SchedulerConfig, choices={"scheduler": sorted(SCHEDULERS)}, skip=("max_model_len",))


def _slo(args: argparse.Namespace) -> SLOTargets:
    from pacer.bench.metrics import SLOTargets, parse_slo_classes

    if args.slo_tpot_ms is not None and args.slo_tbt_ms is not None:
        raise ValueError("a run is judged by one decode SLO: --slo-tpot-ms (the mean gap) or --slo-tbt-ms (the p99 "
                         "gap), not both")
    tpot = args.slo_tpot_ms is not None
    return SLOTargets(ttft_s=_seconds(args.slo_ttft_ms), tbt_s=_seconds(args.slo_tpot_ms if tpot else args.slo_tbt_ms),
               tbt_stat="mean" if tpot else "p99", classes=parse_slo_classes(args.slo_classes))


def _compare_configs(args: argparse.Namespace) -> dict[str, list[str]]:
    """--schedulers, --config NAME=FLAGS (pacer serve, each with --server-args) and --server NAME=COMMAND
    -> {name: command line}, in that order."""
    from pacer.bench.servers import pacer_command

    common = shlex.split(args.server_args)
    configs = {name: pacer_command(common + ["--scheduler", name])
               for name in (args.schedulers or "").split(",") if name}
    configs |= {name: pacer_command(common + flags) for name, flags in _named(args.config, "--config").items()}
    configs |= _named(args.server, "--server")
    if not configs:
        raise ValueError("pacer bench compare needs --schedulers, --config NAME=FLAGS or --server NAME=COMMAND")
    return configs


def _named(items: list[str], option: str) -> dict[str, list[str]]:
    """The NAME=VALUE items of a repeatable option -> {name: the value split as a shell would}, in order."""
    named = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{option} wants NAME=..., got {item!r}")
        named[name] = shlex.split(value)
    return named


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _bench_flags(parser: argparse.ArgumentParser) -> None:
    from pacer.bench.client import ClientConfig
    from pacer.bench.workload import WorkloadConfig

    add_config_flags(parser, ClientConfig)
    add_config_flags(parser, WorkloadConfig)
    group = _report_flags(parser)
    group.add_argument("--tokenizer", default=None,
                       help="model whose tokenizer sizes the prompts (a .gguf or HF directory; default: the default model)")


def _report_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("SLO and report")
    group.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO in ms (default: none)")
    group.add_argument("--slo-tpot-ms", type=float, default=None,
                       help="TPOT SLO in ms: a request meets it if its mean gap after the first token is within it "
                            "(sent as x-slo-tpot-ms; default: none)")
    group.add_argument("--slo-tbt-ms", type=float, default=None,
                       help="TBT SLO in ms: a request meets it if its p99 gap is within it (sent as x-slo-tbt-ms; "
                            "default: none)")
    group.add_argument("--out", type=Path, default=None, help="write the JSON report (every request's timings) here")
    group.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write PNG plots into DIR")
    return group


def _capacity_flags(parser: argparse.ArgumentParser) -> None:
    from pacer.bench.capacity import CONDITIONS

    search = parser.add_argument_group("capacity search")
    search.add_argument("--condition", choices=CONDITIONS, default="attainment",
                        help="p99_tbt (Sarathi-Serve's): P99 TBT <= SLO and median scheduling delay <= 2 s; "
                             "attainment (DistServe's): >= 90%% of requests meet both SLOs")
    search.add_argument("--min-rate", type=float, default=0.25, help="lowest rate tried (req/s)")
    search.add_argument("--max-rate", type=float, default=4.0, help="first upper rate (doubled while it still meets)")
    search.add_argument("--tolerance", type=float, default=0.05, help="stop when the bracket is this close (relative)")
    search.add_argument("--max-trials", type=int, default=10, help="most workload runs")


def _sim_flags(parser: argparse.ArgumentParser) -> None:
    from pacer.bench.workload import WorkloadConfig

    add_config_flags(parser, WorkloadConfig)
    _sim_engine_flags(parser)
    _report_flags(parser)


def _run_capacity_compare(parent: argparse.ArgumentParser, dest: str, add_flags: Callable[[argparse.ArgumentParser], None],
                          func: Callable[[argparse.Namespace], int], run_help: str,
                          compare_help: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """`run`, `capacity` and `compare` under `parent` (bench and sim share their shape); returns `compare`'s
    parser for its own configuration flags, and the subcommands for more."""
    commands = parent.add_subparsers(dest=dest, required=True)
    run = commands.add_parser("run", help=run_help, formatter_class=_HelpFormatter)
    cap = commands.add_parser("capacity", formatter_class=_HelpFormatter,
                              help="binary-search the highest arrival rate that meets a latency condition")
    cmp = commands.add_parser("compare", formatter_class=_HelpFormatter, help=compare_help)
    for parser in (run, cap, cmp):
        add_flags(parser)
        parser.set_defaults(func=func)
    _capacity_flags(cap)
    return cmp, commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacer", description="An LLM inference server that keeps its promises.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    commands = parser.add_subparsers(dest="command", required=True)
    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              formatter_class=_HelpFormatter)
    add_config_flags(srv, ServerConfig)
    _engine_flags(srv)
    add_config_flags(srv, ClusterConfig, choices={"router": sorted(ROUTERS)})
    srv.set_defaults(func=serve)
    ben = commands.add_parser("bench", help="load-test an OpenAI-compatible server: TTFT, TBT, goodput, capacity")
    cmp, bench_commands = _run_capacity_compare(ben, "bench_command", _bench_flags, bench, "run one workload and report",
                                "start several server configurations in turn; same workload; side by side")
    servers = cmp.add_argument_group("configurations (the --base-url flag is ignored: compare starts its servers)")
    servers.add_argument("--schedulers", default=None, help="comma-separated policies, one server each: fcfs,orca,sarathi")
    servers.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                         help="a named configuration, e.g. 'budget256=--max-num-batched-tokens 256' (repeatable)")
    servers.add_argument("--server", action="append", default=[], metavar="NAME=COMMAND",
                         help="any OpenAI-compatible server, started the same way; {port} in COMMAND is replaced, "
                              "e.g. 'vllm=vllm serve MODEL --port {port}' (repeatable)")
    servers.add_argument("--server-args", default="", help="flags given to every pacer server, e.g. '--dtype float32'")
    suite = bench_commands.add_parser("suite", formatter_class=_HelpFormatter,
                                      help="run the pre-registered suite (a TOML file) against each server in turn")
    suite.add_argument("suite", type=Path, help="the suite file, e.g. benchmarks/suite.toml")
    suite.add_argument("--out", type=Path, required=True, help="folder for records/, report.json and tables.md")
    suite.add_argument("--servers", default=None, help="comma-separated subset of the file's servers")
    suite.add_argument("--workloads", default=None, help="comma-separated subset of the file's workloads")
    suite.add_argument("--repeats", type=int, default=None, help="override the file's repeats (a trial run)")
    suite.set_defaults(func=bench_suite)
    sim_parser = commands.add_parser("sim", help="simulate a workload in virtual time: the real scheduler, a latency "
                                                 "model for the model")
    sim_cmp, _ = _run_capacity_compare(sim_parser, "sim_command", _sim_flags, sim, "simulate one workload and report",
                                    "several configurations on the same workload, side by side")
    configs = sim_cmp.add_argument_group("configurations")
    configs.add_argument("--schedulers", default=None, help="comma-separated policies, one configuration each")
    configs.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS",
                         help="a named configuration: sim and scheduler flags over this command's, e.g. "
                              "'sarathi2048=--scheduler sarathi --max-num-batched-tokens 2048' (repeatable)")
    prof = commands.add_parser("profile", formatter_class=_HelpFormatter,
                               help="time the model over a grid of batch shapes and fit the latency model")
    _engine_flags(prof)
    prof.add_argument("--quick", action="store_true", help="the smaller grid `pacer serve` runs at start-up")
    prof.add_argument("--out", type=Path, default=None,
                      help="where to save the profile (default: the cache `pacer serve --latency-profile auto` reads)")
    prof.set_defaults(func=profile)
    gen = commands.add_parser("generate", help="generate completions for prompts, offline",
                              formatter_class=_HelpFormatter)
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable); default: lines of stdin")
    gen.add_argument("--raw", action="store_true", help="no chat template: complete the text as is")
    _engine_flags(gen)
    _sampling_flags(gen)
    gen.set_defaults(func=generate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, MissingExtra) as e:
        print(f"pacer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
