"""Plots for BENCHMARKS.md from the data ballast-bench writes (bench-data.json).

Usage: plot.py DATA.json OUTDIR. Prints the names of the PNG files it wrote.
Bars are medians; error bars span the fastest and slowest run.
"""
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def med(v):
    return statistics.median(v) if v else 0.0


def err(v):
    if not v:
        return [0.0, 0.0]
    m = med(v)
    return [m - min(v), max(v) - m]


def bars(ax, rows, key, title, ylabel):
    names = [r["short"] for r in rows]
    vals = [med(r[key]) for r in rows]
    errs = list(zip(*[err(r[key]) for r in rows])) or [[], []]
    colors = ["#d62728" if r["short"] == "ballast" else ("#7f7f7f" if r["short"] == "routing" else "#1f77b4") for r in rows]
    ax.bar(names, vals, yerr=errs, color=colors, capsize=3)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)


def contenders(rows, out):
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    bars(axes[0][0], rows, "crr", "TCP connections per second (short request)", "conn/s")
    bars(axes[0][1], rows, "crr_cpu_us", "Machine CPU per connection", "µs")
    bars(axes[1][0], rows, "bulk_gbps", "Bulk TCP, one stream", "Gbit/s")
    bars(axes[1][1], rows, "udp", "UDP request/answer", "answers/s")
    fig.suptitle("The LB hop side by side (client → LB → 3 backends on veth, 2 vCPUs shared)")
    fig.tight_layout()
    a = os.path.join(out, "contenders.png")
    fig.savefig(a, dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.27
    xs = range(len(rows))
    for i, (key, label) in enumerate([("lat_p50", "p50"), ("lat_p99", "p99"), ("lat_p999", "p99.9")]):
        ax.bar([x + (i - 1) * width for x in xs], [med(r[key]) for r in rows], width,
               yerr=list(zip(*[err(r[key]) for r in rows])), capsize=2, label=label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["short"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("µs (log)")
    ax.set_title("Latency of a short request on a fresh connection at a fixed offered rate")
    ax.legend()
    fig.tight_layout()
    b = os.path.join(out, "latency.png")
    fig.savefig(b, dpi=90)
    plt.close(fig)
    return [a, b]


def rules(data, out):
    if not data:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for tool, pts in data.items():
        pts = [p for p in pts if p.get("sync_s") is not None]
        if not pts:
            continue
        axes[0].plot([p["services"] for p in pts], [p["sync_s"] for p in pts], marker="o", label=tool)
        axes[1].plot([p["services"] for p in pts], [med(p["crr"]) for p in pts], marker="o", label=tool)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("services")
        ax.legend()
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds (log)")
    axes[0].set_title("Time to program all services")
    axes[1].set_ylabel("conn/s")
    axes[1].set_title("Connection rate to the last service")
    fig.tight_layout()
    c = os.path.join(out, "rules.png")
    fig.savefig(c, dpi=90)
    plt.close(fig)
    return [c]


def lbhop(rows, out):
    """Mpps on one CPU per contender, one group per (traffic, services)."""
    # The generator's floor rows carry ns only, and the established-cost sweep's points
    # ("active") are a table of their own: both are in the report, not the plot.
    rows = [r for r in rows if r["lb"] != "floor" and "active" not in r]
    if not rows:
        return []
    groups = []
    for r in rows:
        g = (r["traffic"], r["services"])
        if g not in groups:
            groups.append(g)
    lbs = []
    for r in rows:
        if r["lb"] not in lbs:
            lbs.append(r["lb"])
    colors = {"ballast": "#d62728", "routing": "#7f7f7f", "iptables": "#1f77b4", "nftables": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(lbs), 1)
    for i, lb in enumerate(lbs):
        xs, vals, errs = [], [], []
        for gi, g in enumerate(groups):
            hit = [r for r in rows if r["lb"] == lb and (r["traffic"], r["services"]) == g]
            if not hit:
                continue
            xs.append(gi + (i - (len(lbs) - 1) / 2) * width)
            vals.append(med(hit[0]["mpps"]))
            errs.append(err(hit[0]["mpps"]))
        ax.bar(xs, vals, width, yerr=list(zip(*errs)) or None, capsize=2, label=lb, color=colors.get(lb))
    ax.set_xticks(list(range(len(groups))))
    ax.set_xticklabels([f"{t}\n{n} services" for t, n in groups])
    ax.set_ylabel("Mpps on one CPU")
    ax.set_title("LB hop with in-kernel generated frames (XDP live frames), packets per second on one CPU")
    ax.legend()
    fig.tight_layout()
    p = os.path.join(out, "lbhop.png")
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return [p]


def main():
    data_path, out = sys.argv[1], sys.argv[2]
    with open(data_path) as f:
        data = json.load(f)
    os.makedirs(out, exist_ok=True)
    written = (
        contenders(data.get("contenders", []), out)
        + rules(data.get("rules"), out)
        + lbhop(data.get("lbhop", []), out)
    )
    for w in written:
        print(os.path.basename(w))


if __name__ == "__main__":
    main()
