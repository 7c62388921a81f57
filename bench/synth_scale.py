"""phiforge synth at 10^4, 10^5, 10^6 short documents against the load generator, 2 shard processes. JSON.

    python bench/synth_scale.py                 # 10^4, 10^5, 10^6 (the last takes long on a small machine)
    python bench/synth_scale.py --quick         # 10^4 only, same JSON keys (under a minute)
    python bench/synth_scale.py --sizes 10000 200000 --shards 2

Each size is a fresh run: `phiforge loadgen` in its own process answers instantly, and N processes
`phiforge synth CONFIG --shard K/N` write one output folder. Measured per size: docs/s of the whole run
(documents / wall time until the last shard process exits) and each process's peak RSS (wait4's
ru_maxrss). The load generator does no inference: these figures are phiforge's own overhead (planning,
HTTP client, request cache, journal, shards, stats), not a teacher's speed. Criteria, from the same run:
peak RSS growth from the smallest to the largest size <= 100 MB per process, and docs/s at the largest
size >= 0.8x docs/s at the smallest. On a shared machine the docs/s ratio is the figure to trust.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

CONFIG = """[run]
num_documents = {n}
shard_size = {shard_size}
chunk_size = {window}
progress = false
[teacher]
kind = "openai"
base_url = "{url}"
model = "loadgen"
concurrency = {concurrency}
timeout = 30
[sampling]
max_new_tokens = {words}
[filter]
min_words = 8
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_loadgen() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "phiforge.data.synth.loadgen", "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("loadgen: listening on "):
        proc.kill()
        raise SystemExit(f"the load generator did not start: {line!r}")
    return proc, line.split()[-1]


def run_size(n: int, shards: int, url: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"synth-{n}"
    config = work / f"synth-{n}.toml"
    config.write_text(CONFIG.format(n=n, shard_size=args.shard_size, window=args.window, url=url,
                                    concurrency=args.concurrency, words=args.words))
    cmd = [sys.executable, "-m", "phiforge", "synth", str(config), f"run.out_dir={out}"]
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--shard", f"{k}/{shards}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=ENV) for k in range(shards)]
    processes = []
    for k, proc in enumerate(procs):
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"shard {k}/{shards} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
        stats = json.loads(stdout)
        processes.append({"shard": f"{k}/{shards}", "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                          "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "seconds": round(seconds, 1),
                          "documents": stats["generated_this_run"], "docs_per_s": stats["docs_per_s"]})
    seconds = time.perf_counter() - start
    merged = json.loads((out / "stats.json").read_text())
    if not merged.get("complete") or merged["documents"] + merged["rejected"] != n:
        raise SystemExit(f"{out}: incomplete run: {merged.get('missing_shards')} shards missing")
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if not args.keep:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"documents": n, "seconds": round(seconds, 1), "docs_per_s": round(n / seconds, 1),
            "max_peak_rss_mb": max(p["peak_rss_mb"] for p in processes), "processes": processes,
            "output_bytes": disk, "kept": merged["documents"], "rejected": merged["rejected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the smallest size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--window", type=int, default=512, help="run.chunk_size: documents in flight per process")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP requests in flight per process")
    parser.add_argument("--words", type=int, default=48, help="words per document (max_new_tokens)")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the output folders")
    args = parser.parse_args()
    sizes = sorted(args.sizes)[:1] if args.quick else sorted(args.sizes)
    loadgen, url = start_loadgen()
    results = {}
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            for n in sizes:
                results[str(n)] = run_size(n, args.shards, url, args, Path(tmp))
                print(json.dumps({"size": n, **results[str(n)]}), file=sys.stderr, flush=True)
    finally:
        loadgen.kill()
        loadgen.wait()
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    growth = [b["peak_rss_mb"] - a["peak_rss_mb"] for a, b in zip(small["processes"], large["processes"])]
    ratio = large["docs_per_s"] / small["docs_per_s"]
    report = {
        "bench": "synth_scale", "cpu": cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
        "note": "phiforge's own overhead against an instant load generator (no inference); shared machine",
        "config": {"shards": args.shards, "shard_size": args.shard_size, "window": args.window,
                   "concurrency": args.concurrency, "words": args.words, "quick": args.quick},
        "sizes": results,
        "criteria": {"from": sizes[0], "to": sizes[-1], "peak_rss_growth_mb": [round(g, 1) for g in growth],
                     "peak_rss_growth_ok": len(sizes) > 1 and max(growth) <= 100,
                     "docs_per_s_ratio": round(ratio, 3), "docs_per_s_ok": len(sizes) > 1 and ratio >= 0.8},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
