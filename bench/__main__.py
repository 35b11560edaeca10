"""`python -m bench [CASE ...] [--quick]`: onnxpipe against transformers + torch and Optimum, side by side.

CASE: limits, encoder, generation, coldstart, size, fidelity (default: all), optionally narrowed
by a model or task name (bert, distilbert, default (the built-in default models), text-classification, token-classification,
question-answering, smollm2, gpt2). The machine's limits are measured in every run.

A full run writes bench/results/run-<time>.json, latest.json, latest.md and latest.png;
--quick (a few repetitions, a small subset, a couple of minutes) writes under bench/results/quick/.
`python -m bench peers` (never part of the default run) measures onnxpipe beside onnxruntime-genai, llama.cpp,
CTranslate2 and OpenVINO, each installed into its own venv under .cache/peers/ (bench/peers/), and writes
bench/results/peers.json and peers.md and the README's "vs the fast engines" table.
`--report FILE.json` re-renders the table and plot from a saved run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = ("limits", "encoder", "generation", "coldstart", "size", "fidelity")
FILTERS = ("bert", "distilbert", "default", "text-classification", "token-classification", "question-answering", "smollm2", "gpt2")
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES + FILTERS)}")
    parser.add_argument("--quick", action="store_true", help="few repetitions, small subset (a sanity check)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="intra-op threads for every contender (default: %(default)s)")
    parser.add_argument("--report", metavar="JSON", nargs="+",
                        help="only re-render latest.md / latest.png from saved run(s); several runs of different "
                             "cases are merged into one report (the first one's machine limits are kept)")
    parser.add_argument("--readme", action="store_true", help="with --report: also rewrite the README's Benchmarks section")
    args = parser.parse_args(argv)

    from . import report

    if args.report:
        results = merge_runs([json.loads(Path(p).read_text()) for p in args.report], args.report)
        results["targets"] = report.targets(results)  # a partial run has none yet
        out = Path(args.report[0]).parent
        report.write(results, out / "latest.md", out / "latest.png")
        print(f"wrote {out / 'latest.md'} and {out / 'latest.png'}")
        if args.readme:
            report.update_readme(results, README)
        return 0
    if "peers" in args.cases:
        if len(args.cases) > 1:
            parser.error("peers is a case of its own: run `python -m bench peers [--quick]`")
        return run_peers(args.threads, args.quick)
    unknown = [c for c in args.cases if c not in CASES + FILTERS]
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}: use any of {', '.join(CASES + FILTERS)}")
    cases = [c for c in args.cases if c in CASES] or list(CASES)
    only = [c for c in args.cases if c in FILTERS] or None
    results = run(cases, only, args.threads, args.quick)

    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["meta"]["started"].replace(":", "").replace("-", "")[:15]
    path = out / f"run-{stamp}.json"
    text = json.dumps(results, indent=1, default=float)
    path.write_text(text)
    (out / "latest.json").write_text(text)
    report.write(results, out / "latest.md", out / "latest.png")
    print(f"wrote {path}, {out / 'latest.md'} and {out / 'latest.png'}")
    if not args.quick and cases == list(CASES) and only is None and report.update_readme(results, README):
        print(f"updated the Benchmarks section of {README}")
    return 0


def run_peers(threads: int, quick: bool) -> int:
    """The fast engines beside onnxpipe (issue 26): bench/peers/."""
    from .peers import report as peers_report, run as peers_run

    meta = machine_info(threads, quick)
    print(f"bench peers: {meta['mode']} run with {threads} threads on {meta['cpu']} ({meta['cpu_features']}); "
          f"load average {meta['loadavg_start']}", flush=True)
    results = peers_run.run(threads, quick, meta)
    out = RESULTS / "quick" if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "peers.md").write_text(peers_report.markdown(results))
    print(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")
    try:
        peers_report.plot(results, out / "peers.png")
        plotted = True
    except Exception as e:  # matplotlib missing: the tables are still written
        print(f"bench peers: no plot ({type(e).__name__}: {e})")
        plotted = False
    if not quick and peers_report.update_readme(results, README, with_plot=plotted):
        print(f"updated the \"vs the fast engines\" table in {README}")
    return 0


def merge_runs(runs: list[dict], names: list[str]) -> dict:
    """One results dict from runs of different cases: each section comes from the first run that has it."""
    merged = {"meta": dict(runs[0]["meta"])}
    if len(runs) > 1:
        merged["meta"]["parts"] = [{"file": Path(n).name, "cases": [k for k in r if k in CASES or k == "limits_end"],
                                    "started": r["meta"]["started"], "finished": r["meta"].get("finished"),
                                    "loadavg_start": r["meta"]["loadavg_start"], "loadavg_end": r["meta"].get("loadavg_end")}
                                   for n, r in zip(names, runs)]
        merged["meta"]["command"] = "python -m bench --report " + " ".join(Path(n).name for n in names)
        merged["meta"]["started"] = min(r["meta"]["started"] for r in runs)
        merged["meta"]["finished"] = max(r["meta"].get("finished") or "" for r in runs)
        merged["meta"]["duration_s"] = sum(r["meta"].get("duration_s") or 0 for r in runs)
        merged["meta"]["loadavg_end"] = runs[-1]["meta"].get("loadavg_end")
    for r in runs:
        for key, value in r.items():
            if key not in ("meta", "targets") and key not in merged:
                merged[key] = value
    return merged


def run(cases: list[str], only: list[str] | None, threads: int, quick: bool) -> dict:
    from onnxpipe.session import share_thread_pool

    # Every ONNX Runtime contender (onnxpipe's and Optimum's) runs on one shared pool of `threads` threads:
    # a pool per session, seven of them in one process, slowed whichever contender ran next (runtime/session.py).
    share_thread_pool(threads)
    # the in-process contenders load without onnxpipe's session cache (it changes how fast a session is created,
    # not how fast it runs, and would write gigabytes of bench models into ~/.cache); the cold-start section
    # gives each of its processes the cache setting it measures
    os.environ["ONNXPIPE_SESSION_CACHE"] = "off"
    meta = machine_info(threads, quick)
    meta["ort_thread_pool"] = f"one shared intra-op pool of {threads} threads for every ONNX Runtime session"
    meta["cases"], meta["filters"] = cases, only
    results: dict = {"meta": meta}
    t_start = time.time()
    print(f"bench: {'quick' if quick else 'full'} run of {', '.join(cases)} with {threads} threads; "
          f"load average {meta['loadavg_start']}", flush=True)

    from . import limits

    results["limits"] = limits.measure(threads, quick=quick)
    _section_done(results, "limits", t_start)
    gemm, bw = results["limits"]["gemm_gflops"], results["limits"]["bandwidth_gbs"]
    if "coldstart" in cases:  # first, while this process is small: each contender is a fresh child process
        from . import coldstart

        results["coldstart"] = coldstart.run(threads, quick)
        _section_done(results, "coldstart", t_start)
    if "encoder" in cases:
        from . import encoder

        results["encoder"] = encoder.run(threads, quick, gemm, only)
        _section_done(results, "encoder", t_start)
    if "generation" in cases:
        from . import generation

        results["generation"] = generation.run(threads, quick, bw, only)
        _section_done(results, "generation", t_start)
    if "size" in cases:
        from . import size

        results["size"] = size.run(quick)
        _section_done(results, "size", t_start)
    if "fidelity" in cases:
        from . import fidelity

        results["fidelity"] = fidelity.run(threads, quick)
        _section_done(results, "fidelity", t_start)
    if len(cases) > 1 and "limits" in cases:  # the machine again at the end: did it drift during the run?
        results["limits_end"] = limits.measure(threads, quick=True)
    meta["finished"] = _now()
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_s"] = round(time.time() - t_start, 1)
    from . import report

    results["targets"] = report.targets(results)
    return results


def _section_done(results: dict, name: str, t_start: float) -> None:
    """Record the load, and save what is measured so far (a run cut short still leaves its figures)."""
    load = [round(x, 2) for x in os.getloadavg()]
    partial = RESULTS / ("quick" if results["meta"]["mode"] == "quick" else "") / "partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps(results, indent=1, default=float))
    results["meta"].setdefault("sections", {})[name] = {"done_after_s": round(time.time() - t_start, 1), "loadavg": load}
    print(f"bench: {name} done after {time.time() - t_start:.0f} s (load average {load})", flush=True)


def machine_info(threads: int, quick: bool) -> dict:
    import numpy
    import onnxruntime

    from .serve_load import cpu_model

    cpu = cpu_model()
    versions = {"python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    for name in ("torch", "transformers", "optimum", "optimum.onnxruntime", "tokenizers"):
        try:
            from importlib import metadata

            versions[name] = metadata.version(name if name != "optimum.onnxruntime" else "optimum-onnx")
        except Exception:
            pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"started": _now(), "mode": "quick" if quick else "full", "threads": threads, "cpu": cpu,
            "cpu_features": cpu_features(),
            "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "versions": versions, "git_commit": commit,
            "command": " ".join(["python -m bench", *sys.argv[1:]])}


def cpu_features() -> str:
    """The SIMD extensions that decide which MLAS / torch kernels run (AVX-512 and VNNI change int8 speed most)."""
    try:
        flags = set(next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")))
    except (OSError, StopIteration):
        return ""
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return " ".join(f for f in keep if f in flags) or "no AVX2"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


if __name__ == "__main__":
    sys.exit(main())
