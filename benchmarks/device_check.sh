#!/usr/bin/env bash
# The one prepared GPU run (device tool): the README's n=160 comparison on CUDA, the device tests, then memory against n.
#
# The device image has its own torch (2.11 + CUDA 13, Python 3.12) and no network, so unrollc runs from the
# checkout (PYTHONPATH) instead of `pip install -e .` (which would ask for torch==2.13.0), and higher comes
# from a carried wheel. Before the run, on the CPU machine:
#     pip download --no-deps higher==0.2.1 -d .device_wheels && echo /.device_wheels/ >> .git/info/exclude
# then: run(command="bash benchmarks/device_check.sh", carry=[".device_wheels"], timeout_s=580).
# Results land in $OUT (env.txt, bench.txt + bench/{results.json,bench.png}, tests.txt, growth.txt + growth/results.json,
# errs.txt: the ends of the benches' stderr); under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_out}"
mkdir -p "$OUT/bench" "$OUT/growth"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .device_wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install --quiet --no-deps .device_wheels/*.whl 2>&1 | tail -1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"
  python3 -c "import higher; print('higher', higher.__version__ if hasattr(higher, '__version__') else 'ok')" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# 1. the README's comparison on CUDA (memory: torch.cuda.max_memory_allocated); medians of 3 runs
timeout 270 python3 -m unrollc.bench --device cuda --optimizer sgd adam --n 160 --methods unrollc higher \
    --schedules none sqrt --repeats 3 --threads 0 --no-saved-bytes --out-dir "$OUT/bench" 2>/tmp/bench.err | tee "$OUT/bench.txt"
# 2. correctness on the device (tests/test_device.py), then the GPU-independent core as a smoke check
timeout 140 python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_device.py tests/test_api.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
# 3. memory against n on CUDA: binomial with fixed slots and sqrt, n = 64 and 1024 (one run each)
timeout 130 python3 -m unrollc.bench --device cuda --optimizer sgd --n 64 1024 --methods unrollc \
    --schedules sqrt binomial --repeats 1 --threads 0 --no-saved-bytes --out-dir "$OUT/growth" 2>/tmp/growth.err | tee "$OUT/growth.txt"
# at most 8 files come back: keep the JSON (it holds every CSV column), and the ends of the logs
rm -f "$OUT"/bench/results.csv "$OUT"/growth/results.csv "$OUT"/growth/bench.png
for f in /tmp/bench.err /tmp/growth.err; do echo "== $f"; tail -c 2500 "$f" 2>/dev/null; done > "$OUT/errs.txt"
ls -R "$OUT"
