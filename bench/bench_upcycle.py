"""Peak memory of upcycling against the size of what it writes: the conversion streams a layer at a time.

    python -m bench.bench_upcycle [--quick] [--out bench/results]

A dense Llama made from a config (random weights, fp32; about 670 MiB, or 85 MiB with ``--quick``)
is saved by one subprocess. Then, each in a fresh subprocess that reports its own max RSS: the
baseline (imports, the source's config and the meta-device model the upcycler checks names
against, no tensor read) and the upcycle itself to E=8, top-2. The difference is what streaming
costs; it should be about one upcycled layer (the largest shard), not the output.
Writes ``<out>/upcycle.json`` and ``<out>/upcycle.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.environment import describe_machine

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
SIZES = {  # hidden, intermediate, layers, vocab
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000),
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, vocab_size=8000),
}
EXPERTS, TOP_K = 8, 2

MAKE = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(num_attention_heads=8, num_key_value_heads=8, **{shape})
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
"""
BASELINE = """
import resource, sys
from pathlib import Path
from transformers import AutoConfig
from moge_ds.upcycle import expected_names, tensor_files
src = Path(sys.argv[1])
expected_names(AutoConfig.from_pretrained(src)), tensor_files(src)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
UPCYCLE = """
import resource, sys
from moge_ds.upcycle import main
main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def child(code: str, *args: str) -> tuple[float, float]:
    """(max RSS in MiB, seconds) of ``code`` run in a fresh interpreter."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024, time.perf_counter() - start


def dir_mib(path: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / MIB


def measure(shape: dict, work: Path) -> dict:
    src, out = work / "dense", work / "moe"
    subprocess.run([sys.executable, "-c", MAKE.format(shape=shape), str(src)], cwd=REPO, check=True,
                   capture_output=True)
    baseline_rss, _ = child(BASELINE, str(src))
    rss, seconds = child(UPCYCLE, str(src), "--out", str(out), "--num-experts", str(EXPERTS), "--top-k", str(TOP_K))
    largest = max(p.stat().st_size for p in out.glob("*.safetensors")) / MIB
    return {"shape": shape, "experts": EXPERTS, "top_k": TOP_K, "dense_mib": dir_mib(src), "moe_mib": dir_mib(out),
            "largest_shard_mib": largest, "baseline_rss_mib": baseline_rss, "upcycle_rss_mib": rss,
            "streaming_cost_mib": rss - baseline_rss, "seconds": seconds}


def markdown(result: dict) -> str:
    r = result["result"]
    return "\n".join([
        "# Upcycling: peak memory vs output size", "", f"`{result['command']}` on {result['machine']}", "",
        "| dense | upcycled (E=8) | largest shard (one layer) | baseline RSS | upcycle RSS | RSS - baseline | time |",
        "|---|---|---|---|---|---|---|",
        f"| {r['dense_mib']:.0f} MiB | {r['moe_mib']:.0f} MiB | {r['largest_shard_mib']:.0f} MiB | "
        f"{r['baseline_rss_mib']:.0f} MiB | {r['upcycle_rss_mib']:.0f} MiB | {r['streaming_cost_mib']:.0f} MiB | "
        f"{r['seconds']:.1f} s |", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = {"machine": describe_machine(), "command": "python -m bench.bench_upcycle" + " --quick" * args.quick,
                  "result": measure(SIZES["quick" if args.quick else "full"], Path(work))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "upcycle.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "upcycle.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
