"""Per-kernel GPU time of one training step from an ncu CSV (`ncu --csv --metrics
gpu__time_duration.sum`): the kernels between the ends of the last two optimizer launch groups
(`adamw_tensors`), summed by name. Usage: python3 benches/ncu_summary.py ncu.csv [marker]"""
import csv, collections, re, sys

path = sys.argv[1]
marker = sys.argv[2] if len(sys.argv) > 2 else "adamw_tensors"
rows = []
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    unit = r.get("Metric Unit", "nsecond")
    v = float(r["Metric Value"].replace(",", ""))
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    rows.append((r["Kernel Name"], v * scale, r.get("Grid Size", ""), r.get("Block Size", "")))
print(f"{len(rows)} kernels in {path}, {sum(t for _, t, _, _ in rows):.1f} ms in all")
ends = [i for i, (n, *_) in enumerate(rows) if marker in n and (i + 1 == len(rows) or marker not in rows[i + 1][0])]
if len(ends) >= 2:
    step = rows[ends[-2] + 1 : ends[-1] + 1]
    print(f"last step: kernels {ends[-2] + 1}..{ends[-1]} ({len(ends)} '{marker}' groups seen)")
else:
    step = rows
    print(f"no two '{marker}' groups: all kernels")
short = lambda n: re.sub(r"\s+", " ", n)[:110]
by = collections.defaultdict(lambda: [0, 0.0])
for n, t, *_ in step:
    by[short(n)][0] += 1
    by[short(n)][1] += t
total = sum(t for _, t, _, _ in step)
print(f"step: {len(step)} kernels, {total:.2f} ms")
print(f"{'ms':>9} {'%':>5} {'count':>6}  kernel")
for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:60]:
    print(f"{t:9.3f} {100 * t / total:5.1f} {c:6d}  {n}")
# The step in launch order, for placing kernels in the layer (first 400 launches).
print("\nlaunch order (first 400 of the step):")
for i, (n, t, g, b) in enumerate(step[:400]):
    print(f"{i:4d} {t:8.3f} {g:>16} {b:>12}  {short(n)[:90]}")
