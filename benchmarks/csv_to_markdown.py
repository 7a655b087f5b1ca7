"""Turn the benchmark CSV into the Markdown tables of BENCHMARKS.md.

    python benchmarks/csv_to_markdown.py results/benchmark.csv [--skip-variant fused[torch]]
"""
import argparse
import csv


def fmt(v: str) -> str:
    x = float(v)
    if x != x:
        return "–"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.0f}"


def efmt(v: str) -> str:
    x = float(v)
    return "–" if x != x else f"{x:.1e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--skip-variant", nargs="*", default=[])
    args = ap.parse_args()
    rows = [r for r in csv.DictReader(open(args.csv)) if r["variant"] not in args.skip_variant]
    for op in dict.fromkeys(r["op"] for r in rows):
        print(f"\n#### {op}\n")
        graphs = any(float(r.get("graph_fwd_bwd_ms", "nan")) == float(r.get("graph_fwd_bwd_ms", "nan"))
                     for r in rows if r["op"] == op)
        extra = " graph fwd+bwd ms | graph speed-up |" if graphs else ""
        print("| shape | variant | fwd ms | bwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |" + extra +
              " HBM floor fwd+bwd ms | peak MB | saved MB | rel. err out | rel. err grad |")
        print("|---" * (12 + 2 * graphs) + "|")
        for r in rows:
            if r["op"] == op:
                g = (f" {fmt(r['graph_fwd_bwd_ms'])} | {float(r['speedup_graph']):.2f}× |" if graphs else "")
                print(f"| {r['shape']} | {r['variant']} | {fmt(r['fwd_ms'])} | {fmt(r['bwd_ms'])} | {fmt(r['fwd_bwd_ms'])} "
                      f"| {float(r['speedup_fwd']):.2f}× | {float(r['speedup_fwd_bwd']):.2f}× |{g} {fmt(r['floor_fwd_bwd_ms'])} "
                      f"| {fmt(r['peak_mb'])} | {fmt(r.get('saved_mb', 'nan'))} | {efmt(r['err_out'])} "
                      f"| {efmt(r['err_grad'])} |")


if __name__ == "__main__":
    main()
