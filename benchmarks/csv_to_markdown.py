"""Turn the benchmark CSV into the Markdown tables of BENCHMARKS.md.

    python benchmarks/csv_to_markdown.py results/benchmark.csv [--skip-variant fused[torch]]

CSVs from before the forward graph columns existed print "–" there.
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


def ratio(v: str) -> str:
    x = float(v)
    return "–" if x != x else f"{x:.2f}×"


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
        extra = " graph fwd ms | graph fwd speed-up | graph fwd+bwd ms | graph speed-up |" if graphs else ""
        print("| shape | variant | fwd ms | bwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |" + extra +
              " HBM floor fwd ms | HBM floor fwd+bwd ms | peak MB | saved MB | rel. err out | rel. err grad |")
        print("|---" * (13 + 4 * graphs) + "|")
        for r in rows:
            if r["op"] == op:
                g = (f" {fmt(r.get('graph_fwd_ms', 'nan'))} | {ratio(r.get('speedup_graph_fwd', 'nan'))} |"
                     f" {fmt(r['graph_fwd_bwd_ms'])} | {ratio(r['speedup_graph'])} |" if graphs else "")
                print(f"| {r['shape']} | {r['variant']} | {fmt(r['fwd_ms'])} | {fmt(r['bwd_ms'])} | {fmt(r['fwd_bwd_ms'])} "
                      f"| {ratio(r['speedup_fwd'])} | {ratio(r['speedup_fwd_bwd'])} |{g} {fmt(r.get('floor_fwd_ms', 'nan'))} "
                      f"| {fmt(r['floor_fwd_bwd_ms'])} | {fmt(r['peak_mb'])} | {fmt(r.get('saved_mb', 'nan'))} "
                      f"| {efmt(r['err_out'])} | {efmt(r['err_grad'])} |")


if __name__ == "__main__":
    main()
