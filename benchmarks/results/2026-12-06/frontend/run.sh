#!/bin/bash
# the same client (serve_load.py at 3ced7f5) against the server before (3ced7f5) and after (main), interleaved
for i in 1 2 3; do
  for side in old new; do
    if [ $side = old ]; then root=/tmp/oldwt; else root=/work/main; fi
    (cd $root && PYTHONPATH=$root /work/main/.venv/bin/python /tmp/oldwt/benchmarks/serve_load.py --servers pacer \
       --repeats 1 --no-offline --out /tmp/level/${side}_$i.json) > /tmp/level/${side}_$i.md 2> /tmp/level/${side}_$i.err
  done
done
