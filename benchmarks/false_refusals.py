"""Were admission's refusals right? From one suite folder: each run of the server with admission control is matched
with the run of a server without it on the very same requests (the suite gives a workload, rate and repeat one seed,
whatever the server), and each refused request is looked up there. A refusal is false if the same request met every
SLO without admission; an acceptance is false if the admitted request then missed.

    python benchmarks/false_refusals.py benchmarks/results/DATE --with pacer-slo --without pacer

It is an estimate: the server without admission schedules by another policy, and serves the requests admission
refused, which also changes what the others see. `benchmarks/sim_refusals.py` does it exactly in the simulator.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

from pacer.bench.metrics import RequestRecord, meets_slo, request_metrics
from pacer.bench.suite import load_suite


def runs(folder: Path, server: str) -> dict[tuple[str, float, int], list[RequestRecord]]:
    with gzip.open(folder / "records" / f"{server}.json.gz", "rt") as f:
        return {(run["workload"], run["rate"], run["repeat"]): [RequestRecord(**r) for r in run["requests"]]
                for run in json.load(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a suite's output folder (records/SERVER.json.gz)")
    parser.add_argument("--suite", type=Path, default=Path(__file__).parent / "suite.toml")
    parser.add_argument("--with", dest="admitting", default="pacer-slo", help="the server with admission control")
    parser.add_argument("--without", default="pacer", help="a server without it, on the same requests")
    args = parser.parse_args()
    suite = load_suite(args.suite)
    admitting, plain = runs(args.folder, args.admitting), runs(args.folder, args.without)
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for key, records in admitting.items():
        workload = key[0]
        if key not in plain:
            continue
        spec = suite.workloads[workload]
        for kind in spec.kinds:
            slo = suite.slo.judged(kind, spec.config.slo_classes)
            tally = counts[(workload, kind)]
            for refused, served in zip(records, plain[key], strict=True):
                assert refused.index == served.index and refused.num_prompt_tokens == served.num_prompt_tokens
                ok = served.status == "ok" and all(meets_slo(request_metrics(served), slo.of(served.slo_class)))
                if refused.status == "rejected":
                    tally["refused"] += 1
                    tally["refused but met without admission"] += ok
                elif refused.status == "ok":
                    tally["accepted"] += 1
                    tally["accepted and missed"] += not all(meets_slo(request_metrics(refused),
                                                                      slo.of(refused.slo_class)))
    print(f"| workload / SLO | refused | false refusals (met under {args.without}) | accepted | missed |")
    print("|---|---|---|---|---|")
    for (workload, kind), t in sorted(counts.items()):
        share = f"{t['refused but met without admission']} ({t['refused but met without admission'] / t['refused']:.0%})" \
            if t["refused"] else "0"
        print(f"| {workload} / {kind} | {t['refused']} | {share} | {t['accepted']} | {t['accepted and missed']} |")


if __name__ == "__main__":
    main()
