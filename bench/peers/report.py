"""peers.json -> peers.md and the README's "vs the fast engines" table."""
from __future__ import annotations

from pathlib import Path

from .int4_variants import NAME as INT4_SYMMETRIC

README_START = "<!-- section: bench peers (issue 26) -->"
README_END = "<!-- /section: bench peers -->"


def _load(x) -> str:
    return ", ".join(f"{v:.2f}" for v in x) if x else "–"


def _ratio(c: dict, key: str = "ratio_vs_onnxpipe") -> str:
    r = c.get(key)
    if not r:
        return "–"
    return f"**{r['median']:.2f}**" + (f" ({r['min']:.2f}–{r['max']:.2f})" if r["rounds"] > 1 else "")


def _precision(c: dict) -> str:
    i = c.get("info") or {}
    parts = [str(i.get("precision"))]
    if "INFERENCE_PRECISION_HINT" in i:
        parts.append(f"INFERENCE_PRECISION_HINT={i['INFERENCE_PRECISION_HINT']}")
    if i.get("compute_type") and i["compute_type"] != i.get("precision"):
        parts.append(f"compute_type={i['compute_type']}")
    return ", ".join(parts)


def _load_note(start, threads) -> str:
    """What the load at the start says of the figures: the run's own threads make a load of about `threads`."""
    one_min = (start or [0])[0]
    if one_min > (threads or 2) + 0.5:
        return ("- the load was not this run's alone: other work shared the machine's cores when it started. Absolute "
                "figures are below an idle machine's and ratios between engines move with the load (engines wait for "
                "descheduled threads differently); read the ratios with the load beside them")
    return ("- the machine was otherwise quiet: a load near the thread count is this run's own engines; each round's "
            "load is beside its table")


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# onnxpipe vs the fast engines (`python -m bench peers`)", "",
             f"- CPU: **{m.get('cpu')}** ({m.get('cores')} cores; features: {m.get('cpu_features')}), "
             f"{m.get('threads')} threads for every engine",
             f"- started {m.get('started')}, {m.get('mode')} run, {m.get('duration_s')} s; load average (1, 5, 15 min) "
             f"**{_load(m.get('loadavg_start'))}** at the start, **{_load(m.get('loadavg_end'))}** at the end "
             "(a shared 2-core machine: other work ran beside this one, interleaving spreads it over all contenders)",
             "- each contender runs in a process of its own (its engine's venv), timed inside that process around the "
             "engine's own call; contenders of a workload take turns in a fresh seeded order every round; a ratio is "
             "the peer's rate over onnxpipe's at the same precision in the same round (median, min–max over rounds): "
             "**> 1 means the peer is faster**",
             f"- {m.get('omp_wait_policy', '')}", "", _load_note(m.get("loadavg_start"), m.get("threads")),
             "", "## Installs", "", "| engine | versions | runtime install size |", "|---|---|---|"]
    for e, r in res["installs"].items():
        if "error" in r:
            lines.append(f"| {e} | install failed: {r['error']} | |")
        else:
            v = ", ".join(f"{k} {x}" for k, x in sorted((r.get("versions") or {}).items()) if x)
            size = f"{r['size_mb']:.0f} MB" if r.get("size_mb") else "–"
            lines.append(f"| {e} | {v} | {size} |")
    lines += ["", "Runtime install size: the files of the engine's distribution and everything it requires "
              "(bench/size.py's closure), resolved in its venv; for onnxpipe its serve-time closure (numpy, tokenizers, "
              "onnxruntime). Not counted: pip, and what only the converters need (transformers; torch, read from "
              "onnxpipe's venv); NNCF (OpenVINO's int8 calibration) is installed beside OpenVINO and not counted.", ""]
    lines += targets_md(res)
    for row in res.get("decode", []):
        lines += [f"## {row['workload']}", "",
                  f"Greedy, {row['prompt_tokens']}-token news prompt, {row['new_tokens']} new tokens, decode tokens/s "
                  f"after the first token, {row['rounds']} rounds; 1-min load per round {_load(row['loadavg_1min_per_round'])}.", "",
                  "| contender | precision | tok/s (min–max) | peer / onnxpipe | greedy tokens equal to onnxpipe fp32's |",
                  "|---|---|---|---|---|"]
        for label, c in row["contenders"].items():
            lines.append(f"| {label} | {_precision(c)} | {c['tokens_per_s']:.1f} ({c['min']:.1f}–{c['max']:.1f}) | "
                         f"{_ratio(c)} | {c.get('greedy_agrees_with_onnxpipe_fp32_for', '–')} |")
        for label, e in row.get("errors", {}).items():
            lines.append(f"| {label} | failed: {e[:120]} | | | |")
        lines.append("")
    lines += batch_md(res)
    for row in res.get("encode", []):
        lines += [f"## {row['workload']}", "",
                  f"One forward on the same ids (the model alone, no tokenizer), median of {row['forwards_per_round']} per "
                  f"round, {row['rounds']} rounds; 1-min load per round {_load(row['loadavg_1min_per_round'])}.", "",
                  "| contender | precision | p50 (min–max) | peer / onnxpipe |" +
                  (" peer / onnxpipe int8 |" if row["precision"] == "native default" else ""),
                  "|---|---|---|---|" + ("---|" if row["precision"] == "native default" else "")]
        for label, c in row["contenders"].items():
            extra = f" {_ratio(c, 'ratio_vs_onnxpipe_int8')} |" if row["precision"] == "native default" else ""
            lines.append(f"| {label} | {_precision(c)} | {c['p50_ms']:.1f} ms ({c['min_ms']:.1f}–{c['max_ms']:.1f}) | "
                         f"{_ratio(c)} |{extra}")
        for label, e in row.get("errors", {}).items():
            lines.append(f"| {label} | failed: {e[:120]} | | |" + (" |" if row["precision"] == "native default" else ""))
        lines.append("")
    fid = res.get("int4_fidelity")
    if fid:
        lines += ["## int4 variants: perplexity on the news text", "",
                  f"{len(fid['articles'])} news articles, {fid['tokens_per_article']} tokens each, all-position logits "
                  "(the same corpus as `python -m bench fidelity`); the decode speeds are in the int4 table above. "
                  "onnxpipe's default int4 stores asymmetric blocks of 32 with a float offset each (llama.cpp's Q4_1 "
                  "layout), the LM head in 8 bits and the embeddings in 4; `--int4-method symmetric` uses MatMulNBits' own "
                  "symmetric blocks. "
                  "This SmolLM2 is a Q4_1 GGUF dequantized, so its weights lie on Q4_1's grid: the default and "
                  "llama.cpp's Q4_1 reproduce them exactly, which weights from elsewhere would not allow.", "",
                  "| variant | perplexity | vs fp32 | weights on disk |", "|---|---|---|---|"]
        for name, p in fid["perplexity"].items():
            wb = fid.get("weights_bytes", {}).get(name)
            lines.append(f"| {name} | {p['ppl']:.2f} | {p['vs_fp32']:+.1%} | {f'{wb / 1e6:.0f} MB' if wb else '–'} |")
        lines.append("")
    if res.get("preparation_errors"):
        lines += ["## Not measured, and why", ""]
        lines += [f"- {k}: {v}" for k, v in res["preparation_errors"].items()]
        lines.append("")
    return "\n".join(lines)


def batch_md(res: dict) -> list[str]:
    """The batch decode workload's tables and what batching each engine offers."""
    rows = res.get("decode_batch") or []
    out = []
    for row in rows:
        b = row.get("batch", 8)
        out += [f"## {row['workload']}", "",
                f"{b} different prompts decoding together (the first {row['prompt_tokens']} tokens of {b} news articles, "
                f"equal lengths: no engine pads), greedy, {row['new_tokens']} new tokens each; aggregate decode tokens/s: "
                f"the {b} sequences' tokens after their first over the time from the step that gave the first tokens to "
                f"the last step; {row['rounds']} rounds; 1-min load per round {_load(row['loadavg_1min_per_round'])}.", "",
                "| contender | precision | batching | aggregate tok/s (min–max) | peer / onnxpipe | greedy tokens equal to "
                f"onnxpipe fp32's (least of the {b} sequences) |", "|---|---|---|---|---|---|"]
        for label, c in row["contenders"].items():
            how = (c.get("info") or {}).get("batching", "–")
            out.append(f"| {label} | {_precision(c)} | {how} | {c['tokens_per_s']:.1f} ({c['min']:.1f}–{c['max']:.1f}) | "
                       f"{_ratio(c)} | {c.get('greedy_agrees_with_onnxpipe_fp32_for', '–')} |")
        for label, e in row.get("errors", {}).items():
            out.append(f"| {label} | failed: {e[:120]} | | | | |")
        out.append("")
    srv = res.get("server_concurrent")
    if rows and srv and srv.get("runs"):
        out += ["## onnxpipe's server under concurrent clients (a separate run)", "",
                f"From `{srv['command']}` ({srv['source']}; {srv.get('cpu')}, {srv.get('cpus')} CPUs shared by the clients "
                f"and the server, 1-min load {_load([x for x in srv.get('loadavg_1m') or [] if x is not None])}): "
                "the continuous-batching engine above behind HTTP, streaming chat completions (SSE), greedy, "
                f"{srv.get('new_tokens')} new tokens per request on average (spread {srv.get('length_spread')}), "
                "closed-loop clients. Not interleaved with the peers; no peer's server was run (llama-cpp-python does "
                "not build `llama-server`).", "",
                "| precision | clients | aggregate tok/s | per-stream tok/s (p50) | TTFT p50 (ms) |", "|---|---|---|---|---|"]
        out += [f"| {r['precision']} | {r['clients']} | {r['aggregate_tokens_per_s']} | {r['stream_tokens_per_s_p50']} | "
                f"{r['ttft_p50_ms']} |" for r in srv["runs"]]
        out.append("")
    if rows and res.get("batching"):
        out += ["## What each engine offers for decoding several sequences together", ""]
        out += [f"- **{e}**: {v}" for e, v in res["batching"].items()]
        out.append("")
    return out


def _rows(res: dict) -> list[dict]:
    """Every workload's row, in the report's order."""
    return res.get("decode", []) + res.get("decode_batch", []) + res.get("encode", [])


def _peer_ratios(row: dict) -> list[tuple[str, dict]]:
    """(peer, its ratio to onnxpipe) for the row's peers that have one: at the same precision, or for the
    OpenVINO-default rows against onnxpipe int8 (its fastest path)."""
    key = "ratio_vs_onnxpipe_int8" if row["precision"] == "native default" else "ratio_vs_onnxpipe"
    return [(label, c[key]) for label, c in row["contenders"].items() if not label.startswith("onnxpipe") and c.get(key)]


def targets_md(res: dict) -> list[str]:
    """Issue 26's speed targets on this CPU, from the ratios: onnxpipe >= every peer at the same precision (a peer's
    median ratio <= 1). The OpenVINO-default rows are judged against onnxpipe's int8 (its fastest path)."""
    m = res["meta"]
    out = [f"## Targets on this CPU ({m.get('cpu')}, {m.get('cpu_features')})", "",
           "onnxpipe >= every peer at the same precision (median ratio <= 1); fidelity targets are in "
           "`python -m bench fidelity` and the int4 perplexity table below.", "", "| workload | holds? | faster peers |",
           "|---|---|---|"]
    for row in _rows(res):
        peers = _peer_ratios(row)
        faster = [f"{label} {r['median']:.2f}x" for label, r in peers if r["median"] > 1]
        if not peers:
            continue
        what = row["workload"] + (" (judged against onnxpipe int8)" if row["precision"] == "native default" else "")
        out.append(f"| {what} | {'❌ no' if faster else '✅ yes'} | {', '.join(faster) or '–'} |")
    return out + [""]


def summary_table(res: dict) -> list[str]:
    """The README's table: one row per workload, one column per peer, ratios (> 1: the peer is faster)."""
    peers = [("onnxruntime-genai", "onnxruntime-genai"), ("llama.cpp", "llama.cpp"), ("CTranslate2", "CTranslate2"),
             ("OpenVINO", "OpenVINO")]
    m = res["meta"]
    ver = {e: (r.get("versions") or {}) for e, r in res["installs"].items()}
    head = {"onnxruntime-genai": f"onnxruntime-genai {ver.get('onnxruntime-genai', {}).get('onnxruntime-genai', '')}",
            "llama.cpp": f"llama.cpp (llama-cpp-python {ver.get('llama.cpp', {}).get('llama-cpp-python', '')})",
            "CTranslate2": f"CTranslate2 {ver.get('ctranslate2', {}).get('ctranslate2', '')}",
            "OpenVINO": f"OpenVINO {ver.get('openvino', {}).get('openvino', '')}"}
    out = [f"On **{m.get('cpu')}** ({m.get('cpu_features')}), {m.get('threads')} threads each, load average "
           f"{_load(m.get('loadavg_start'))} → {_load(m.get('loadavg_end'))} ({m.get('started')}); each cell is the peer's "
           "speed over onnxpipe's at the same precision, median over interleaved rounds (**> 1: the peer is faster**). "
           "Measured by `python -m bench peers` (never part of the default run: it installs the four engines into their own "
           "venvs under `.cache/peers/` once, llama.cpp compiled without AMX). "
           "Full tables, precisions, the targets and what could not run: [bench/results/peers.md](bench/results/peers.md).", "",
           "| workload (onnxpipe) | " + " | ".join(head[p] for p, _ in peers) + " |", "|---|" + "---|" * len(peers)]
    for row in _rows(res):
        ref = row["contenders"].get(row["reference"])
        if row["workload"].startswith("SmolLM2"):
            ours = f"{ref['tokens_per_s']:.0f} tok/s" if ref else "–"
        else:
            ours = f"{ref['p50_ms']:.1f} ms" if ref else "–"
        cells = []
        for _, prefix in peers:
            found = [(label, c) for label, c in row["contenders"].items() if label.startswith(prefix)]
            cells.append("; ".join(f"{_ratio(c).split(' (')[0]} ({label[len(prefix):].strip() or _precision(c)})"
                                   for label, c in found) or "–")
        out.append(f"| {row['workload']} ({ours}) | " + " | ".join(cells) + " |")
    out += _int4_line(res)
    sizes = ", ".join(f"{e} {r['size_mb']:.0f} MB" for e, r in res["installs"].items() if r.get("size_mb"))
    out += ["", f"Runtime install sizes measured here (each engine's dependency closure): {sizes}."]
    return out


def _int4_line(res: dict) -> list[str]:
    """The int4 variants' speed and perplexity in one sentence (the README's table has speeds only)."""
    fid = (res.get("int4_fidelity") or {}).get("perplexity", {})
    int4 = next((r for r in res.get("decode", []) if r["precision"] == "int4"), None)
    sym = int4 and int4["contenders"].get(INT4_SYMMETRIC)
    if not (sym and sym.get("ratio_vs_onnxpipe") and "onnxpipe int4" in fid and INT4_SYMMETRIC in fid):
        return []
    genai = fid.get("onnxruntime-genai int4")
    return ["", f"int4 perplexity on the news text vs fp32: onnxpipe's default {fid['onnxpipe int4']['vs_fp32']:+.1%}; "
                f"`--int4-method symmetric` {fid[INT4_SYMMETRIC]['vs_fp32']:+.1%} at "
                f"{sym['ratio_vs_onnxpipe']['median']:.2f}x the default's decode speed"
                + (f"; onnxruntime-genai int4 {genai['vs_fp32']:+.1%}" if genai else "")
                + " (this SmolLM2 is a dequantized Q4_1 GGUF: bench/results/peers.md)."]


def readme_block(res: dict, with_plot: bool = False) -> str:
    image = ["", "![each peer's speed over onnxpipe's, per workload](bench/results/peers.png)"] if with_plot else []
    return "\n".join([README_START, "", "### vs the fast engines", "", *summary_table(res), *image, "", README_END])


def plot(res: dict, path: Path) -> None:
    """Each peer's speed over onnxpipe's at the same precision, one bar per (workload, peer): the median ratio with
    its min-max over rounds; left of 1, onnxpipe is faster. The OpenVINO-default rows against onnxpipe int8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, median, min, max)
    for row in _rows(res):
        short = row["workload"].replace("SmolLM2-135M ", "SmolLM2 ").replace("OpenVINO's default precision "
                                                                               "(vs onnxpipe fp32)", "native")
        against = " (vs onnxpipe int8)" if row["precision"] == "native default" else ""
        bars += [(f"{short}: {label}{against}", r["median"], r["min"], r["max"]) for label, r in _peer_ratios(row)]
    if not bars:
        raise ValueError("no ratios to plot")
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(bars) + 1.6))
    y = list(range(len(bars)))[::-1]
    med = [b[1] for b in bars]
    err = [[b[1] - b[2] for b in bars], [b[3] - b[1] for b in bars]]
    ax.barh(y, [m - 1 for m in med], left=1, xerr=err, color=["tab:red" if m > 1 else "tab:green" for m in med],
            error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.axvline(1, color="k", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=7)
    ax.set_xlabel("peer's speed / onnxpipe's, same precision (log; > 1: the peer is faster; bar: median, line: "
                  "min-max over rounds)", fontsize=8)
    m = res["meta"]
    ax.set_title(f"onnxpipe vs the fast engines: {m.get('cpu')}, {m.get('threads')} threads, {m.get('started')} "
                 f"(load {_load(m.get('loadavg_start'))})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def update_readme(res: dict, readme: Path, with_plot: bool = False) -> bool:
    """Put the block in the Benchmarks section (replacing an older one), before the section's next `## ` heading."""
    text = readme.read_text()
    block = readme_block(res, with_plot)
    if README_START in text and README_END in text:
        a, b = text.index(README_START), text.index(README_END) + len(README_END)
        readme.write_text(text[:a] + block + text[b:])
        return True
    start = text.find("\n## Benchmarks")
    if start < 0:
        return False
    nxt = text.find("\n## ", start + 5)
    end = nxt if nxt >= 0 else len(text)
    readme.write_text(text[:end].rstrip("\n") + "\n\n" + block + "\n" + text[end:])
    return True
