"""A run's JSON -> the markdown table (latest.md), the issue's targets checked, and a plot (latest.png)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from .contenders import REFERENCE
from .limits import above_ceiling, fmt_share
from .timing import fmt_ms

ONNX_FP32 = ("onnxpipe fp32", "onnxpipe fp32 fused")
ONNX_INT8 = ("onnxpipe int8 (QUInt8)", "onnxpipe int8 fused (QInt8 per-channel)")


def write(results: dict, md_path: Path, png_path: Path) -> None:
    md_path.write_text(markdown(results))
    try:
        plot(results, png_path)
    except Exception as e:  # matplotlib missing: the table is still written
        print(f"bench: no plot ({type(e).__name__}: {e})")


# --- the targets ------------------------------------------------------------------------------------------

def targets(results: dict) -> list[dict]:
    out = []

    def add(target, figure, ok):
        out.append({"target": target, "figure": figure, "pass": ok})

    cls = {(r["batch"], r["length"]): r for r in results.get("encoder", [])
           if r["arch"] == "bert" and r["task"] == "text-classification"}
    if (1, 128) in cls:
        r = cls[(1, 128)]
        name, s = _best(r, ONNX_FP32)
        fp = r.get("floor_paired")
        if s and fp and s.get("over_peak_floor"):
            # the floors timed in the same rounds as the pipelines: ratios taken round by round
            over, chain = s["over_peak_floor"], s.get("over_chain_floor")
            text = (f"{name} {fmt_ms(s['p50'])} = {over['median']:.2f}x ({over['min']:.2f}–{over['max']:.2f}) the peak-rate "
                    f"floor timed in the same rounds ({fmt_ms(fp['peak_rate_ms']['p50'])}: {r['gflop']:.1f} GFLOP at the "
                    f"{fp['probe_shape']} GEMM's {fp['probe_gflops']['p50']:.0f} GFLOP/s)")
            if chain:
                text += (f"; {chain['median']:.2f}x the model's own matmuls chained in one ONNX Runtime graph "
                         f"({fmt_ms(fp['chain_ms']['p50'])})")
            add("BERT-base classification b1 L128 fp32 within 10% of the compute floor", text, over["median"] <= 1.1)
        elif s and r["floor_ms"]:  # a run from before the paired floors
            best_rate = max(x for x in (r.get("gemm_gflops_case"), (results.get("limits") or {}).get("gemm_gflops"),
                                        (results.get("limits_end") or {}).get("gemm_gflops")) if x)
            floor = min(f for f in (r.get("floor_shapes_ms"), r["floor_ms"], r["gflop"] / best_rate * 1e3) if f)
            add("BERT-base classification b1 L128 fp32 within 10% of the compute floor",
                f"{name} {fmt_ms(s['p50'])}: {s['p50'] / floor:.2f}x the floor ({fmt_ms(floor)}, sampled after the case)",
                s["p50"] <= 1.1 * floor)
        name, s = _best(r, ONNX_INT8)
        if s and s.get("speedup_vs_torch"):
            acc = _default_accuracy(results, "text-classification", name)
            acc_txt = (f"; held-out accuracy fp32 {acc[0]:.3f} / int8 {acc[1]:.3f}" if acc else "; no held-out accuracy")
            sp = s["speedup_vs_torch"]["median"]
            add("int8 classification b1 L128 >= 2.5x transformers+torch, accuracy within 1 point",
                f"{name} {sp:.2f}x{acc_txt}", sp >= 2.5 and (acc is None or abs(acc[0] - acc[1]) <= 0.01))
    if (1, 16) in cls:
        name, s = _best(cls[(1, 16)], ONNX_FP32)
        if s and s.get("speedup_vs_torch"):
            sp = s["speedup_vs_torch"]["median"]
            add("classification b1 L16 fp32 >= 3x transformers+torch", f"{name} {sp:.2f}x", sp >= 3)
    if (32, 128) in cls:
        name, s = _best(cls[(32, 128)], ONNX_INT8)
        if s and s.get("speedup_vs_torch"):
            sp = s["speedup_vs_torch"]["median"]
            add("batch 32 throughput int8 >= 1.8x transformers+torch", f"{name} {sp:.2f}x "
                f"({s['items_per_s']:.1f} items/s)", sp >= 1.8)
    for g in results.get("generation", []):
        if g["key"] != "smollm2" or g["batch"] != 1:
            continue
        fp = g["contenders"].get("onnxpipe fp32")
        if fp and fp.get("of_ceiling"):
            mm = g.get("matmul_floor_fp32")
            of_mm = fp.get("of_matmul_ceiling")
            mm_txt = (f"; the step's {mm['matmuls']} weight MatMuls alone, timed in the same rounds, take "
                      f"{mm['p50_ms']:.1f} ms in ONNX Runtime ({mm['gbs']:.1f} GB/s): onnxpipe reaches {of_mm:.0%} of "
                      "that ceiling" if mm and of_mm else "")
            # ONNX Runtime's MatMuls streaming the weights faster than numpy's bandwidth sample prove the sample low:
            # judged against the higher of the two ceilings
            share = min(fp["of_ceiling"], of_mm) if of_mm else fp["of_ceiling"]
            # a result above a ceiling is a broken probe (bench/limits.py): flagged, neither met nor failed
            add("SmolLM2 decode b1 fp32 >= 80% of the bandwidth ceiling",
                f"{fp['steps_per_s']:.1f} tok/s = {fmt_share(fp['of_ceiling'], 'read-bandwidth ceiling')} "
                f"({fp['ceiling_steps_per_s']:.1f} steps/s at {g['bandwidth_gbs']:.1f} GB/s){mm_txt}; "
                f"judged against the higher ceiling: {fmt_share(share)}",
                None if above_ceiling(share) else share >= 0.8)
        ppl = (results.get("fidelity", {}).get("smollm2") or {}).get("perplexity", {})
        base = ppl.get("onnxpipe fp32", {}).get("ppl")
        ref_rate = g["contenders"].get(REFERENCE, {}).get("steps_per_s")
        for cname, pname in (("onnxpipe int8", "onnxpipe int8"), ("onnxpipe int8 (dynamic)", "onnxpipe int8 (dynamic)")):
            c = g["contenders"].get(cname)
            if not c or not ref_rate:
                continue
            ratio = c["steps_per_s"] / ref_rate
            p = ppl.get(pname, {}).get("ppl")
            drift = (p / base - 1) if (p and base) else None
            drift_txt = f", perplexity {drift:+.1%} vs fp32" if drift is not None else ", perplexity not measured"
            add(f"SmolLM2 decode b1 {cname} >= 5x transformers+torch, perplexity within 3%",
                f"{c['steps_per_s']:.1f} vs {ref_rate:.1f} tok/s = {ratio:.2f}x{drift_txt}",
                ratio >= 5 and drift is not None and abs(drift) <= 0.03)
        keeps = g.get("prefill_last_logits_only")
        if keeps is not None:
            add("prefill computes the LM head for the last position only", "yes (logits_to_keep input)" if keeps else
                "no: the export computes logits for every prompt position", keeps)
    cs = results.get("coldstart", {}).get("contenders", {})
    if "onnxpipe fp32" in cs and REFERENCE in cs:
        t = cs[REFERENCE]
        mb = results["coldstart"]["model_bytes"]["fp32"] / 2**20
        o = cs["onnxpipe fp32"]
        first = cs.get("onnxpipe fp32, first start on this machine (writes the session cache)")
        off = cs.get("onnxpipe fp32, session cache off")
        # the default load (session cache on), judged; the very first start and the load without the cache beside it
        extra = "".join(f"; {label} {c['first_result_s']:.2f} s (1/{t['first_result_s'] / c['first_result_s']:.1f})"
                        for label, c in (("first start on a machine (writes the cache)", first), ("cache off", off)) if c)
        name = "onnxpipe fp32" if (first or off) else "onnxpipe fp32, as exported"  # runs from before the cache was on
        add(f"cold start to first BERT-base result ({name}) <= 1/8 of transformers'",
            f"{o['first_result_s']:.2f} s vs {t['first_result_s']:.2f} s (1/{t['first_result_s'] / o['first_result_s']:.1f}){extra}",
            o["first_result_s"] <= t["first_result_s"] / 8)
        for name in ("onnxpipe fp32", "onnxpipe fp32, session cache off"):
            o = cs.get(name)
            if o is None:
                continue
            add(f"peak RSS ({name}) <= model file + 150 MB", f"{o['peak_rss_mib']:.0f} MiB vs {mb:.0f} + 150 MiB",
                o["peak_rss_mib"] <= mb + 150 * 1e6 / 2**20)
    size = results.get("size")
    if size and "ratio" in size:
        add("serve-time install <= 1/4 of transformers+torch", f"{size['serve_bytes'] / 1e6:.0f} MB vs "
            f"{size['heavy_bytes'] / 1e6:.0f} MB (1/{1 / size['ratio']:.1f})", size["ratio"] <= 0.25)
    return out


def _verdict(ok) -> str:
    """None: the figure is above a physical ceiling, a measurement error (neither met nor failed)."""
    return "⚠️ measurement error" if ok is None else "✅ met" if ok else "❌ not met"


def _best(row: dict, names) -> tuple[str | None, dict | None]:
    found = [(n, row["contenders"][n]) for n in names if n in row["contenders"]]
    if not found:
        return None, None
    return min(found, key=lambda kv: kv[1]["p50"])


def _default_accuracy(results: dict, task: str, contender: str):
    """(fp32, int8) held-out accuracy of the default classifier with the int8 weights `contender` uses."""
    acc = ((results.get("fidelity") or {}).get("sentiment_weight_types") or {}).get("accuracy", {})
    key = "int8 QInt8 per-channel" if "QInt8 per-channel" in contender else "int8 QUInt8" if "QUInt8" in contender else None
    if key in acc:
        return acc["fp32"], acc[key]
    return None


# --- markdown ------------------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# onnxpipe benchmark ({m['mode']} run)", "",
             f"Run {m['started']} → {m.get('finished', '?')} ({m.get('duration_s', '?')} s), `{m['command']}`, "
             f"commit {m['git_commit']}. {_cpu(m)}, {m['cores']} cores, {m['memory_gib']} GiB; **{m['threads']} threads "
             f"for every contender**. Load average (1/5/15 min) at start {_load(m['loadavg_start'])}, at end "
             f"{_load(m.get('loadavg_end'))} (2 threads per contender on 2 cores make a load of ~2 on their own): "
             "compare contenders within a row (measured interleaved) rather than across runs.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    for part in m.get("parts", []):
        lines.insert(-1, f"- part `{part['file']}` ({', '.join(part['cases'])}): {part['started']} → {part['finished']}, "
                         f"load average {_load(part['loadavg_start'])} → {_load(part['loadavg_end'])}")
    if m.get("parts"):
        lines.insert(-1 - len(m["parts"]), "This report merges runs of different cases (`--report A.json B.json ...`):")
    lim = results.get("limits")
    if lim:
        end = results.get("limits_end")
        lines += ["## Machine limits (same run)", "",
                  f"- float32 GEMM: **{lim['gemm_gflops']:.0f} GFLOP/s** ({lim['gemm_note']}; by shape: "
                  + ", ".join(f"{k} {v['p50']:.0f}" for k, v in lim["gemm_by_shape"].items()) + ")"
                  + (f"; {end['gemm_gflops']:.0f} at the end of the run" if end else ""),
                  f"- memory read bandwidth: **{lim['bandwidth_gbs']:.1f} GB/s** ({lim['bandwidth_note']})"
                  + (f"; {end['bandwidth_gbs']:.1f} at the end" if end else ""), ""]
    if results.get("targets"):
        lines += ["## The issue's targets", "", "| target | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['figure']} | {_verdict(t['pass'])} |" for t in results["targets"]]
        lines.append("")
    if results.get("encoder"):
        lines += _encoder_md(results["encoder"])
    if results.get("generation"):
        lines += _generation_md(results["generation"])
    if results.get("coldstart"):
        lines += _coldstart_md(results["coldstart"])
    if results.get("size"):
        lines += _size_md(results["size"])
    if results.get("fidelity"):
        lines += _fidelity_md(results["fidelity"])
    return "\n".join(lines) + "\n"


def _cpu(meta: dict) -> str:
    return f"{meta['cpu']} ({meta.get('cpu_features') or 'CPU features not recorded'})"


def _load(x) -> str:
    return " / ".join(f"{v:.1f}" for v in x) if x else "?"


def _speed(s: dict | None) -> str:
    if not s:
        return ""
    return f" **{s['median']:.2f}x** ({s['min']:.2f}–{s['max']:.2f})"


def _encoder_md(rows: list[dict]) -> list[str]:
    out = ["## Encoder tasks: whole pipeline (tokenize, run, postprocess)", "",
           "Batch 1: p50 / p95 latency; batch 32: items/s. **Speed-up vs transformers+torch** is the median of "
           "round-by-round ratios (min–max). The floors are timed in the same rounds as the contenders: the "
           "model's matmuls alone, chained in one ONNX Runtime graph with distinct weights per layer, and all its "
           "matmul FLOPs at the rate a favourable GEMM reached in that round (the rate is given below each table).", ""]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"]), []).append(r)
    for (model, task), rs in groups.items():
        shapes = [(r["batch"], r["length"]) for r in rs]
        head = [f"b{b} L{l}" for b, l in shapes]
        out += [f"### {model}, {task}", "", "| contender | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        names = []
        for r in rs:
            names += [n for n in r["contenders"] if n not in names]
        for n in names:
            cells = []
            for r in rs:
                s = r["contenders"].get(n)
                if s is None:
                    err = r["errors"].get(n, "not run")
                    cells.append(f"failed: {err[:60]}")
                elif r["batch"] == 1:
                    cells.append(f"{fmt_ms(s['p50'])} / {fmt_ms(s['p95'])}" + ("" if n == REFERENCE else _speed(s["speedup_vs_torch"])))
                else:
                    cells.append(f"{s['items_per_s']:.1f}/s ({fmt_ms(s['p50'])})" + ("" if n == REFERENCE else _speed(s["speedup_vs_torch"])))
            mark = " †" if any(r["contenders"].get(n, {}).get("path", "pipeline") != "pipeline" for r in rs) else ""
            out.append(f"| {n}{mark} | " + " | ".join(cells) + " |")
        if all(r.get("floor_paired") for r in rs):
            out.append("| *floor: the model's matmuls chained in one ONNX Runtime graph* | " + " | ".join(
                fmt_ms(r["floor_paired"]["chain_ms"]["p50"]) for r in rs) + " |")
            out.append("| *floor: all FLOPs at the GEMM probe's rate, same rounds* | " + " | ".join(
                f"{fmt_ms(r['floor_paired']['peak_rate_ms']['p50'])} ({r['gflop']:.1f} GFLOP)" for r in rs) + " |")
            rates = ", ".join(f"{r['floor_paired']['probe_gflops']['p50']:.0f}" for r in rs)
            rate_txt = f"GEMM probe ({rs[0]['floor_paired']['probe_shape']}) GFLOP/s, median of the rounds: {rates}."
        else:
            out.append("| *compute floor (fp32): its matmuls timed at their shapes* | " + " | ".join(
                fmt_ms(r["floor_shapes_ms"]) if r.get("floor_shapes_ms") else "–" for r in rs) + " |")
            out.append("| *compute floor (fp32): all FLOPs at the peak GEMM rate* | " + " | ".join(
                (fmt_ms(r["floor_ms"]) + f" ({r['gflop']:.1f} GFLOP)") if r["floor_ms"] else "–" for r in rs) + " |")
            rates = ", ".join(f"{r['gemm_gflops_case']:.0f}" for r in rs if r.get("gemm_gflops_case"))
            rate_txt = f"GEMM GFLOP/s measured after each case: {rates}."
        reps = ", ".join(f"b{r['batch']} L{r['length']}: {min(s['n'] for s in r['contenders'].values())}" for r in rs if r["contenders"])
        out += ["", f"Rounds per contender: {reps}. {rate_txt}"]
        if any(" †" in ln for ln in out[-len(names) - 3:]):
            out.append("† tokenizer + ONNX session only: this task's onnxpipe pipeline was not committed when this ran.")
        out.append("")
    return out


def _generation_md(rows: list[dict]) -> list[str]:
    out = ["## Generation: greedy, prompt of 64 tokens from real news text", "",
           "Prefill = time to the first new token. Decode = tokens/s over the first 64 and all 256 new tokens "
           "(all sequences of the batch), from one timestamp per token; speed-up vs transformers+torch is paired "
           "by round. Ceiling = read bandwidth / weight bytes streamed per step (embedding tables that are only "
           "gathered from are not counted); the bandwidth (the fastest read kernel over a 512 MiB array) and the fp32 step's "
           "weight MatMuls alone are sampled in the same rounds as the contenders, and each contender's share of "
           "a ceiling is the median of its round-by-round shares.", ""]
    for g in rows:
        wb = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in g["weight_bytes_streamed"].items())
        out += [f"### {g['model']}, batch {g['batch']}", "",
                f"Weights streamed per step: {wb}; read bandwidth in the same rounds {g['bandwidth_gbs']:.1f} GB/s (median)."
                + (f" The fp32 step's {g['matmul_floor_fp32']['matmuls']} weight MatMuls alone, in one ONNX Runtime "
                   f"session: {g['matmul_floor_fp32']['p50_ms']:.1f} ms ({g['matmul_floor_fp32']['gbs']:.1f} GB/s), "
                   f"a kernel ceiling of {1e3 / g['matmul_floor_fp32']['p50_ms']:.0f} steps/s."
                   if g.get("matmul_floor_fp32") else ""), "",
                "| contender | prefill p50 | decode tok/s (64) | decode tok/s (256) | step p50 | of bandwidth ceiling |",
                "|---|---|---|---|---|---|"]
        for n, c in g["contenders"].items():
            d64, d256 = c.get("decode_64"), c.get("decode_256")

            def dec(d):
                if not d:
                    return "–"
                return f"{d['tokens_per_s']:.1f}" + ("" if n == REFERENCE else _speed(d.get("speedup_vs_torch")))
            ceil = ("–" if not c.get("of_ceiling") else
                    f"⚠️ measurement error ({c['of_ceiling']:.2f}x a ceiling of {c['ceiling_steps_per_s']:.0f} steps/s)"
                    if above_ceiling(c["of_ceiling"]) else f"{c['of_ceiling']:.0%} of {c['ceiling_steps_per_s']:.0f} steps/s")
            out.append(f"| {n} | {fmt_ms(c['prefill_ms']['p50'])}{'' if n == REFERENCE else _speed(c.get('prefill_speedup_vs_torch'))} "
                       f"| {dec(d64)} | {dec(d256)} | {fmt_ms(c['step_ms']['p50'])} | {ceil} |")
        for n, e in g["errors"].items():
            out.append(f"| {n} | failed: {e[:80]} | | | | |")
        out += ["", f"Runs per contender: {min((c['runs'] for c in g['contenders'].values()), default=0)}.", ""]
    return out


def _coldstart_md(cs: dict) -> list[str]:
    mb = cs["model_bytes"]
    out = ["## Cold start to the first result, peak RSS (separate processes)", "",
           f"{cs['model']}, one short text; a fresh `python` per run, time from spawn to result, RSS = the "
           f"process's VmHWM when it has the result. Model files: fp32 {mb['fp32'] / 2**20:.0f} MiB, int8 {mb['int8'] / 2**20:.0f} MiB "
           f"(page cache warm). Median of {cs['rounds']} run(s).", "",
           "| contender | first result | fraction of transformers' | peak RSS |", "|---|---|---|---|"]
    for n, c in cs["contenders"].items():
        frac = f"1/{1 / c['fraction_of_transformers']:.1f}" if c.get("fraction_of_transformers") else "–"
        out.append(f"| {n} | {c['first_result_s']:.2f} s ({c['min_s']:.2f}–{c['max_s']:.2f}) | {frac} | "
                   f"{c['peak_rss_mib']:.0f} MiB |")
    for n, e in cs["errors"].items():
        out.append(f"| {n} | failed: {e[:80]} | | |")
    return out + [""]


def _size_md(size: dict) -> list[str]:
    fresh = size.get("fresh_serve_venv", {})
    heavy = size["closure_in_project_venv"]["transformers+torch"]
    top = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in list(heavy["distributions"].items())[:4])
    out = ["## Installed size", "",
           f"- serve time (a fresh venv with `onnxpipe[cpu]` only, site-packages less pip/setuptools): "
           f"**{size['serve_bytes'] / 1e6:.0f} MB**"
           + (f" ({', '.join(fresh.get('packages', []))})" if fresh.get("packages") else f" ({fresh.get('error', '')})"),
           f"- transformers + torch and their dependencies (as installed in .venv): **{heavy['bytes'] / 1e6:.0f} MB** "
           f"(largest: {top})",
           f"- ratio: **1/{1 / size['ratio']:.1f}**", ""]
    return out


def _fidelity_md(f: dict) -> list[str]:
    out = ["## Fidelity: what int8 costs", ""]
    defaults = [d for d in f.get("defaults", []) if d.get("evaluation")]
    if defaults:
        out += ["Real defaults, held-out scores as measured by their build (`onnxpipe models`):", "",
                "| model | metric | fp32 | int8 | held-out |", "|---|---|---|---|---|"]
        for d in defaults:
            ev = d["evaluation"]
            split = ev.get("split", {})
            out.append(f"| {d['name']} | {ev['metric']} | {ev['scores']['fp32']:.4g} | {ev['scores']['int8']:.4g} | "
                       f"{split.get('evaluated', '?')} |")
        out.append("")
    else:
        out += ["Real defaults: none built with a held-out evaluation when this ran.", ""]
    w = f.get("sentiment_weight_types")
    if w and "error" not in w:
        out += [f"The default sentiment model ({w['model']}) re-quantized from its fp32 graph, same {w['heldout']} "
                f"held-out sentences (digest {w['heldout_digest']}):", "",
                "| weights | held-out accuracy |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in w["accuracy"].items()]
        out.append("")
    elif w:
        out += [f"Weight-type comparison failed: {w['error']}", ""]
    s = f.get("smollm2")
    if s and "error" not in s:
        out += [f"SmolLM2-135M on real English news ({s['source']}, articles {', '.join(s['article_ids'])}, drawn with "
                f"seed {s['seed']}; first {s['tokens_per_article']} tokens of each):", "",
                "| model | perplexity | vs onnxpipe fp32 | greedy tokens equal to fp32 | tokens before first difference |",
                "|---|---|---|---|---|"]
        agree = s["greedy"]["agreement_vs_fp32"]
        for n, p in s["perplexity"].items():
            a = agree.get(n)
            out.append(f"| {n} | {p['ppl']:.2f} | {p['vs_onnxpipe_fp32']:+.2%} | "
                       f"{'%.0f%%' % (100 * a['mean_fraction_equal']) if a else '–'} | "
                       f"{', '.join(map(str, a['tokens_before_first_difference'])) if a else '–'} |")
        out += ["", f"Greedy: {s['greedy']['prompt_tokens']}-token prompts, {s['greedy']['new_tokens']} new tokens. "
                f"onnxpipe int8 is the export's own int8 file ({s.get('int8_method', '?')}, the tied LM head untied so "
                "it is quantized too); int8 (dynamic) is the same fp32 graph dynamically quantized (QInt8 "
                "per-channel, what the export writes for encoders; built by bench/artifacts.py).", ""]
    elif s:
        out += [f"SmolLM2 text fidelity failed: {s['error']}", ""]
    return out


# --- plot ----------------------------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    m = results["meta"]
    fig.suptitle(f"onnxpipe vs transformers+torch vs Optimum — {m['cpu']}, {m['threads']} threads, "
                 f"{m['started']} (load {_load(m['loadavg_start'])})", fontsize=10)
    _plot_encoder(axes[0][0], results)
    _plot_throughput(axes[0][1], results)
    _plot_decode(axes[1][0], results)
    _plot_coldstart(axes[1][1], results)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _colors(names):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _plot_encoder(ax, results):
    rows = [r for r in results.get("encoder", []) if r["arch"] == "bert" and r["task"] == "text-classification" and r["batch"] == 1]
    if rows:
        ax.set_yscale("log")
    width = _grouped_bars(ax, rows, lambda r, n: r["contenders"][n]["p50"], [f"len {r['length']}" for r in rows],
                          "ms per call, p50 (log)", "BERT-base classification, batch 1 (dashed: fp32 peak-rate floor)")
    for j, r in enumerate(rows):
        if r["floor_ms"]:
            ax.hlines(r["floor_ms"], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--", linewidth=1)


def _plot_throughput(ax, results):
    rows = [r for r in results.get("encoder", []) if r["batch"] > 1]
    _grouped_bars(ax, rows, lambda r, n: r["contenders"][n]["items_per_s"],
                  [f"{_short_model(r['model'])}\n{_SHORT_TASK.get(r['task'], r['task'])}" for r in rows],
                  "items/s (batch 32, len 128)", "Throughput, batch 32 (* real defaults)")


def _plot_decode(ax, results):
    rows = results.get("generation", [])
    _grouped_bars(ax, rows, lambda g, n: g["contenders"][n]["steps_per_s"] * g["batch"],
                  [f"{_short_model(g['model'])}\nbatch {g['batch']}" for g in rows], "decode tokens/s (median step)", "Greedy decode (* real weights)")


def _grouped_bars(ax, rows, value, labels, ylabel, title):
    if not rows:
        ax.set_axis_off()
        return 0.0
    names = list(dict.fromkeys(n for r in rows for n in r["contenders"]))
    colors = _colors(names)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j, r in enumerate(rows) if n in r["contenders"]]
        ax.bar(xs, [value(r, n) for r in rows if n in r["contenders"]], width, label=n, color=colors[n])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    top = ax.get_ylim()[1]  # headroom so the legend does not sit on the bars
    ax.set_ylim(top=top * 6) if ax.get_yscale() == "log" else ax.set_ylim(0, top * 1.45)
    ax.legend(fontsize=6.5, ncol=2, loc="upper left")
    return width


_SHORT_TASK = {"text-classification": "classification", "token-classification": "NER",
               "question-answering": "QA"}


def _short_model(label: str) -> str:
    """'minilm-l6-sentiment-rt (real default)' -> 'minilm-l6-sentiment-rt*'; '(random)' dropped (axis labels)."""
    name, _, note = label.partition(" (")
    return textwrap.fill(name + ("*" if "real" in note else ""), 14)  # breaks at the hyphens


def _plot_coldstart(ax, results):
    cs = (results.get("coldstart") or {}).get("contenders")
    if not cs:
        ax.set_axis_off()
        return
    names = list(cs)
    ax.barh([textwrap.fill(n, 34) for n in names], [cs[n]["first_result_s"] for n in names], color="tab:blue")
    ax.set_xlim(0, max(cs[n]["first_result_s"] for n in names) * 1.3)
    for i, n in enumerate(names):
        ax.text(cs[n]["first_result_s"], i, f" {cs[n]['first_result_s']:.2f} s, {cs[n]['peak_rss_mib']:.0f} MiB",
                va="center", fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds from process spawn to first result (peak RSS)")
    ax.set_title("Cold start, BERT-base classification")


# --- README ------------------------------------------------------------------------------------------------------

README_MARKER = "<!-- section: bench (issue 7) -->"


def update_readme(results: dict, readme: Path) -> bool:
    """Replace the Benchmarks section's body (from its marker to the next `## ` heading) with this run's summary."""
    text = readme.read_text()
    start = text.find(README_MARKER)
    if start < 0:
        return False
    body_start = start + len(README_MARKER)
    nxt = text.find("\n## ", body_start)
    end = nxt if nxt >= 0 else len(text)
    readme.write_text(text[:body_start] + "\n\n" + readme_section(results).rstrip() + "\n" + text[end:])
    return True


def readme_section(results: dict) -> str:
    m = results["meta"]
    lines = [
        "`make bench` (or `python -m bench`) runs everything (~16 min on 2 cores, plus building the benchmark models once); `python -m bench encoder bert` "
        "one case; `python -m bench --quick` a small sanity run. Every contender uses the same weights, the same "
        "inputs and the same thread count (torch `set_num_threads`, ONNX Runtime `intra_op_num_threads`), runs "
        "interleaved with the others call by call, and is compared with transformers + torch round by round. "
        "Contenders: transformers pipeline on torch fp32 (and torch dynamic int8), Optimum `ORTModelFor*` on our "
        "fp32 export, onnxpipe fp32 (plain and `--optimize` fused graphs) and int8. Models: BERT-base / "
        "DistilBERT-base / GPT-2-small shapes with random weights (speed does not depend on the values), the "
        "built-in defaults (real MiniLM-L6 sentiment and NER) and the real SmolLM2-135M. The machine's GEMM rate and memory bandwidth are measured in the same run and each "
        "figure is also given against them. Full tables: [bench/results/latest.md](bench/results/latest.md); "
        "raw figures: `bench/results/run-*.json`.",
        "",
        f"Latest full run: {m['started']}, {_cpu(m)}, {m['threads']} threads, load average {_load(m['loadavg_start'])} "
        f"at the start and {_load(m.get('loadavg_end'))} at the end"
        + (" (the machine was shared with other jobs: absolute times are noisy, the interleaved ratios much less so)."
           if max(m["loadavg_start"][0], (m.get("loadavg_end") or [0])[0]) > 3.0 else
           " (no other job on the machine; the load is the benchmark's own)."),
        "",
        "![benchmark plot](bench/results/latest.png)",
        "",
    ]
    if results.get("targets"):
        lines += ["| target (issue 7) | measured | |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['figure']} | {'measurement error' if t['pass'] is None else 'met' if t['pass'] else '**not met**'} |" for t in results["targets"]]
        lines.append("")
    cls = [r for r in results.get("encoder", []) if r["arch"] == "bert" and r["task"] == "text-classification"]
    if cls:
        lines += _encoder_md(cls)[4:]
    smol = [g for g in results.get("generation", []) if g["key"] == "smollm2"]
    if smol:
        lines += _generation_md(smol)[4:]
    peers = _peers_block()
    if peers:  # the peers case's table (python -m bench peers) survives a full run's rewrite of this section
        lines += ["", peers]
    return "\n".join(lines)


def _peers_block() -> str | None:
    import json

    path = Path(__file__).resolve().parent / "results" / "peers.json"
    if not path.exists():
        return None
    try:
        from .peers.report import readme_block

        return readme_block(json.loads(path.read_text()))
    except Exception:
        return None
