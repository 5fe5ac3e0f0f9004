"""vLLM on CPU: generation throughput of vLLM exports, dense vs pruned, measured in one run.

Each directory is loaded in turn (fp32, eager) and given the same 16 prompts; greedy generation of
`--new-tokens` tokens each, `--repeats` times; the best wall time of the batch is reported as output
tokens per second. Needs vLLM (requirements-vllm.txt) and directories written by
`secateurs export DIR --format vllm --out DIR2`:

    .venv-vllm/bin/python bench/vllm_throughput.py dense-vllm pruned-vllm [--new-tokens 64]

Prints what it measured; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import time

PROMPTS = [
    "The history of the city begins",
    "In the early twentieth century, the river",
    "Scientists have long debated whether",
    "The village church was built",
    "During the war, the regiment",
    "The album was recorded in",
    "Its population grew rapidly after",
    "The species is found in",
    "The first railway line reached",
    "According to the census,",
    "The novel tells the story of",
    "The bridge was designed by",
    "In mathematics, a group is",
    "The festival takes place every",
    "The school was founded in",
    "The mountain is known for",
]


def run(path: str, new_tokens: int, repeats: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=path, dtype="float32", trust_remote_code=True, enforce_eager=True, max_model_len=512,
        gpu_memory_utilization=0.15,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(PROMPTS[:2], params)  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(PROMPTS, params)
        best = min(best, time.perf_counter() - t)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"load_s": load_s, "batch_s": best, "tokens": tokens, "tokens_per_s": tokens / best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="vLLM export directories, the first is the reference")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [(d, run(d, args.new_tokens, args.repeats)) for d in args.dirs]
    ref = rows[0][1]["tokens_per_s"]
    print(f"\n{len(PROMPTS)} prompts x {args.new_tokens} new tokens, fp32, best of {args.repeats}")
    print("| model | load s | batch s | output tokens/s | vs first |")
    print("|---|---|---|---|---|")
    for d, r in rows:
        print(
            f"| {d} | {r['load_s']:.1f} | {r['batch_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / ref:.2f}x |"
        )


if __name__ == "__main__":
    main()
