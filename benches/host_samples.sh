#!/bin/bash
# Where the host's time goes, without perf (the GPU machine has none): attach gdb (or cuda-gdb)
# to a running process N times, INTERVAL seconds apart, and print every thread's stack each time.
# Aggregate with `python3 benches/host_profile.py FILE`. Carry an unstripped binary for names.
#   bash benches/host_samples.sh PID N INTERVAL > samples.txt
set -u
pid=$1 n=${2:-40} interval=${3:-0.25}
gdb=$(command -v gdb || command -v cuda-gdb)
for i in $(seq "$n"); do
  kill -0 "$pid" 2>/dev/null || break
  echo "=== sample $i"
  timeout 20 "$gdb" -nx -batch -p "$pid" -iex 'set auto-load off' -iex 'set debuginfod enabled off' \
    -ex 'set pagination off' -ex 'set print frame-arguments none' -ex 'thread apply all bt 64' 2>/dev/null \
    | grep -E '^(Thread|#)'
  sleep "$interval"
done
