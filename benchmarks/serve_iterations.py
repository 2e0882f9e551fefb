#!/usr/bin/env python3
"""`pacer serve`, recording every iteration its latency model saw: the batch shape, the prediction the scheduler
planned with, the profile's raw prediction, the measured time and the margin it applied. Written when the server
exits (SIGTERM or Ctrl-C), in benchmarks/latency_error.py's format, so `pacer sim --residuals FILE` can replay
the server's own errors, which include what an in-process replay does not: the HTTP front end sharing the
process (and its GIL) with the engine thread.

    .venv/bin/python benchmarks/serve_iterations.py --out benchmarks/out/serve_iterations.json -- --scheduler slo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pacer.cli import main as pacer_main
from pacer.latency.model import BatchShape, LinearLatencyModel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of `pacer serve`")
    args = ap.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args

    rows: list[dict] = []
    observe = LinearLatencyModel.observe

    def recording(self: LinearLatencyModel, shape: BatchShape, predicted_s: float, measured_s: float) -> None:
        # Called on the engine thread once per iteration, before the model learns from it: the margin and
        # correction are the ones this iteration was planned with.
        rows.append({"t": time.monotonic(), "predicted_s": predicted_s, "raw_predicted_s": self.predict_raw(shape),
                     "elapsed_s": measured_s, "margin": self.margin(shape.num_decodes), "shape": shape._asdict()})
        observe(self, shape, predicted_s, measured_s)

    LinearLatencyModel.observe = recording  # type: ignore[method-assign]
    try:
        return pacer_main(["serve", *serve_args])
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": serve_args, "iterations": rows}))
        print(f"{len(rows)} iterations recorded in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
