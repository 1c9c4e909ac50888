"""Turns scripts/bench's results (JSON lines from kms-load) into a Markdown table of kms
against the echo ceiling and an SVG chart (throughput and p99 against concurrency)."""
import json
import sys

results_path, table_path, svg_path = sys.argv[1:4]
fsync_path = sys.argv[4] if len(sys.argv) > 4 else None
rows = [json.loads(line) for line in open(results_path) if line.strip()]
by = {(r["target"], r["op"], r["concurrency"]): r for r in rows}
ops = []
for r in rows:
    if r["op"] not in ops:
        ops.append(r["op"])
concurrencies = sorted({r["concurrency"] for r in rows})

lines = [
    "| operation | concurrency | echo ops/s | kms ops/s | ratio | echo p99 | kms p99 | p99 ratio | kms CPU s / 1000 calls | errors |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for op in ops:
    for c in concurrencies:
        e, k = by.get(("echo", op, c)), by.get(("kms", op, c))
        if not e or not k:
            continue
        ratio = k["ops_per_second"] / e["ops_per_second"] if e["ops_per_second"] else 0
        p99 = k["p99_us"] / e["p99_us"] if e["p99_us"] else 0
        cpu = k.get("server_cpu_seconds_per_1000")
        lines.append(
            f"| {op} | {c} | {e['ops_per_second']:,.0f} | {k['ops_per_second']:,.0f} | "
            f"{ratio:.2f} | {e['p99_us'] / 1000:.2f} ms | {k['p99_us'] / 1000:.2f} ms | {p99:.1f}x | "
            f"{'-' if cpu is None else f'{cpu:.3f}'} | {k['errors'] + e['errors']} |"
        )
# Concurrency 1: kms's p50 against the echo's plus one fdatasync of one page.
if fsync_path:
    fsync = json.load(open(fsync_path))["fdatasync_p50_us"]
    lines.append("")
    lines.append(f"One fdatasync of one page on the store's file system: p50 {fsync:.0f} us.")
    lines.append("")
    lines.append("| operation | echo p50, c1 | kms p50, c1 | echo p50 + fdatasync | kms within it |")
    lines.append("|---|---|---|---|---|")
    for op in ops:
        e, k = by.get(("echo", op, 1)), by.get(("kms", op, 1))
        if e and k:
            bound = e["p50_us"] + fsync
            lines.append(
                f"| {op} | {e['p50_us']:.0f} us | {k['p50_us']:.0f} us | {bound:.0f} us | "
                f"{'yes' if k['p50_us'] <= bound else 'no'} ({k['p50_us'] / bound:.2f}x) |"
            )
open(table_path, "w").write("\n".join(lines) + "\n")

# The chart: one panel per operation, throughput (bars) and p99 (text) per concurrency.
W, H, PANEL = 220, 200, 230
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL * len(ops) + 20}" height="{H + 60}" font-family="sans-serif" font-size="11">']
for i, op in enumerate(ops):
    x0 = 10 + i * PANEL
    top = max([by[(t, op, c)]["ops_per_second"] for t in ("echo", "kms") for c in concurrencies if (t, op, c) in by] + [1])
    svg.append(f'<text x="{x0 + W / 2}" y="14" text-anchor="middle" font-weight="bold">{op} (ops/s; p99 above)</text>')
    svg.append(f'<line x1="{x0}" y1="{H + 20}" x2="{x0 + W}" y2="{H + 20}" stroke="#888"/>')
    slot = W / len(concurrencies)
    for j, c in enumerate(concurrencies):
        for k, (target, colour) in enumerate((("echo", "#999999"), ("kms", "#1f77b4"))):
            r = by.get((target, op, c))
            if not r:
                continue
            h = (H - 30) * r["ops_per_second"] / top
            x = x0 + j * slot + 6 + k * (slot - 12) / 2
            w = (slot - 12) / 2 - 2
            y = H + 20 - h
            svg.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}"><title>{target} c={c}: {r["ops_per_second"]:.0f} ops/s, p99 {r["p99_us"]} us</title></rect>')
            svg.append(f'<text x="{x + w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="9">{r["p99_us"] / 1000:.1f}ms</text>')
        svg.append(f'<text x="{x0 + j * slot + slot / 2:.1f}" y="{H + 34}" text-anchor="middle">c={c}</text>')
svg.append(f'<rect x="10" y="{H + 44}" width="10" height="10" fill="#999999"/><text x="24" y="{H + 53}">echo (the ceiling)</text>')
svg.append(f'<rect x="140" y="{H + 44}" width="10" height="10" fill="#1f77b4"/><text x="154" y="{H + 53}">kms</text>')
svg.append("</svg>")
open(svg_path, "w").write("\n".join(svg) + "\n")
