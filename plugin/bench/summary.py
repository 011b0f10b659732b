"""``minorsft bench``'s summary: per mode the medians of its repeats, and its ratios to its baseline mode against the
targets of ``modes``; the markdown table of BENCHMARKS.md."""

import statistics

from .modes import MODES, TARGETS, WITHOUT_REFERENCE


def summarize(modes: list[str], runs: dict[str, list[dict]], clock: str) -> dict:
    """Medians per mode, and ratios to the mode's baseline (SFT, or online DPO) on ``clock`` ("step_s": wall time,
    "step_cpu_s": the worker's CPU time, which other processes on a shared machine disturb less)."""
    summary = {}
    for mode in modes:
        results = runs[mode]
        steps = [s for r in results for s in r["step_s"]]
        peak_rss = statistics.median(r["peak_rss_kb"] for r in results) / 1024
        net_rss = statistics.median(r["peak_rss_kb"] - r["import_rss_kb"] for r in results) / 1024
        entry = {
            "median_step_s": statistics.median(steps),
            "median_step_s_per_repeat": [statistics.median(r["step_s"]) for r in results],
            "median_step_cpu_s": statistics.median(s for r in results for s in r["step_cpu_s"]),
            "median_step_cpu_s_per_repeat": [statistics.median(r["step_cpu_s"]) for r in results],
            "min_step_cpu_s": min(s for r in results for s in r["step_cpu_s"]),
            "peak_rss_mb": peak_rss,
            "peak_rss_above_imports_mb": net_rss,
            "param_mb": results[0]["param_bytes"] / 2**20,
        }
        if "ref_param_bytes" in results[0]:
            entry["ref_param_mb"] = results[0]["ref_param_bytes"] / 2**20
        for key in ("peak_cuda_bytes", "precompute_s", "precompute_cpu_s", "forward_pass_s", "forward_pass_cpu_s"):
            if key in results[0]:
                entry[key] = statistics.median(r[key] for r in results)
        summary[mode] = entry
    for mode in modes:
        baseline = MODES[mode][1]
        if baseline is None:
            continue
        entry, base = summary[mode], summary[baseline]
        memory_key = "peak_cuda_bytes" if "peak_cuda_bytes" in runs[mode][0] else "net_rss_kb"
        # Each repeat's mode against the same repeat's baseline (run minutes apart), then the median.
        pairs = list(zip(runs[mode], runs[baseline]))
        entry["vs"] = baseline
        entry["step_ratio_clock"] = clock
        entry["step_ratio_per_repeat"] = [statistics.median(m[clock]) / statistics.median(b[clock]) for m, b in pairs]
        entry["step_ratio"] = statistics.median(entry["step_ratio_per_repeat"])
        entry["min_cpu_step_ratio"] = entry["min_step_cpu_s"] / base["min_step_cpu_s"]
        entry["wall_step_ratio"] = statistics.median(
            statistics.median(m["step_s"]) / statistics.median(b["step_s"]) for m, b in pairs
        )
        entry["memory_ratio"] = statistics.median(_memory(m, memory_key) / _memory(b, memory_key) for m, b in pairs)
        entry["process_rss_ratio"] = statistics.median(m["peak_rss_kb"] / b["peak_rss_kb"] for m, b in pairs)
        step_target, memory_target = TARGETS.get(mode, (None, None))
        unit = 1 if memory_key == "peak_cuda_bytes" else 1024
        base_memory = statistics.median(_memory(b, memory_key) for b in runs[baseline])
        if memory_target == WITHOUT_REFERENCE:  # the online baseline less its reference copy's weights
            memory_target = (base_memory - runs[baseline][0].get("ref_param_bytes", 0) / unit) / base_memory
        elif memory_target is None and step_target is not None:  # a reference copy: SFT + its weights + 5 %
            weights = runs[mode][0].get("ref_param_bytes", 0) / unit
            memory_target = 1.05 * (base_memory + weights) / base_memory
        entry["step_target"], entry["memory_target"] = step_target, memory_target
    return summary


def _memory(result: dict, key: str) -> float:
    if key == "net_rss_kb":  # peak RSS above what the imports alone took
        return result["peak_rss_kb"] - result["import_rss_kb"]
    return result[key]


def markdown_table(summary: dict, gpu: bool) -> str:
    memory = "peak CUDA MiB" if gpu else "peak RSS MiB (above imports / process)"
    clock = next((e["step_ratio_clock"] for e in summary.values() if "vs" in e), "step_s")
    ratio_of = "CPU time" if clock == "step_cpu_s" else "wall time"
    lines = [
        f"| mode | vs | median step, wall s (per repeat) | median step, CPU s | {memory} "
        f"| step ratio on {ratio_of} (target) [per repeat] | fastest-step ratio, CPU | step ratio on wall time "
        "| memory ratio (target) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, e in summary.items():
        per_repeat = ", ".join(f"{s:.2f}" for s in e["median_step_s_per_repeat"])
        if gpu:
            mem = f"{e['peak_cuda_bytes'] / 2**20:.0f}"
        else:
            mem = f"{e['peak_rss_above_imports_mb']:.0f} / {e['peak_rss_mb']:.0f}"
        step = fastest = wall = memory_ratio = "—"
        if "vs" in e:
            fastest, wall = f"{e['min_cpu_step_ratio']:.3f}", f"{e['wall_step_ratio']:.3f}"
            step = _ratio(e["step_ratio"], e["step_target"])
            if len(e["step_ratio_per_repeat"]) > 1:
                step += " [" + ", ".join(f"{r:.2f}" for r in e["step_ratio_per_repeat"]) + "]"
            memory_ratio = _ratio(e["memory_ratio"], e["memory_target"])
        lines.append(
            f"| {mode} | {e.get('vs', '—')} | {e['median_step_s']:.2f} ({per_repeat}) | {e['median_step_cpu_s']:.2f} "
            f"| {mem} | {step} | {fastest} | {wall} | {memory_ratio} |"
        )
    sft = summary.get("sft", {})
    for mode, e in summary.items():
        if "precompute_s" in e:
            lines.append("")
            line = f"{mode}: one-off precompute pass {e['precompute_s']:.2f} s ({e['precompute_cpu_s']:.2f} s CPU)"
            if "forward_pass_s" in sft:
                line += (
                    f"; one no-grad forward over the same training set, in the sft run: {sft['forward_pass_s']:.2f} s "
                    f"({sft['forward_pass_cpu_s']:.2f} s CPU)"
                )
            lines.append(line)
    return "\n".join(lines) + "\n"


def _ratio(value: float, target) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} (≤ {target:.2f} {'ok' if value <= target else 'MISSED'})"
