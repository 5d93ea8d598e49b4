"""Benchmark 2, batched generation: evaluation's batched greedy generation (morer1.generation.generate_completions,
what evaluate.predict_facts calls) at batch 8 against one fact at a time, on the same facts in one process, interleaved batch by batch.
Figure: the speed-up (seconds one at a time / seconds batched). The greedy outputs must be identical (checked:
a correctness check, not a timing one; the benchmark fails if they differ).

The model is the fixture's SFT model (`--model` takes another folder, e.g. models/sft after `make run`); the facts
are the fixture's dev and test facts, cycled when there are fewer than asked.
"""

from __future__ import annotations

from pathlib import Path

from common import Stopwatch, parser, report, table
from project import fixture


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the fixture's models/sft)")
    p.add_argument("--facts", type=int, default=None, help="facts generated (default 64, quick 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 160 (evaluate's), quick 16")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    n = args.facts or (8 if args.quick else 64)
    max_new = args.max_new_tokens or (16 if args.quick else 160)
    project = fixture(args.quick)
    model_dir = Path(args.model) if args.model else project / "models" / "sft"
    facts_dir = project / "data" / "ingested"

    import torch

    from morer1.files import read_jsonl
    from morer1.generation import generate_completions
    from morer1.labels import read_labels
    from morer1.modeling import load_model_and_processor
    from morer1.prompt import model_prompt

    labels = read_labels(facts_dir / "labels.json")
    pool = read_jsonl(facts_dir / "dev.jsonl") + read_jsonl(facts_dir / "test.jsonl")
    facts = [pool[i % len(pool)] for i in range(n)]
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    prompt = model_prompt(model_dir)

    def gen(batch_size: int, some=facts):
        return generate_completions(model, processor, some, facts_dir, labels, max_new_tokens=max_new,
                                    batch_size=batch_size, prompt=prompt, progress=False)

    gen(args.batch_size, facts[:args.batch_size])  # warm-up: first-call costs out of both timings
    # Interleaved, one batch of facts at a time (one by one, then batched), so a change of load on a shared machine
    # falls on both ways alike.
    single_s = batched_s = 0.0
    one_by_one, together = [], []
    for start in range(0, n, args.batch_size):
        chunk = facts[start:start + args.batch_size]
        with Stopwatch() as single:
            one_by_one += gen(1, chunk)
        with Stopwatch() as batched:
            together += gen(args.batch_size, chunk)
        single_s += single.seconds
        batched_s += batched.seconds
    if one_by_one != together:
        diff = sum(a != b for a, b in zip(one_by_one, together))
        raise SystemExit(f"batched greedy outputs differ from one-at-a-time ones for {diff} of {n} facts")
    tokens = [len(processor.tokenizer(c[0], add_special_tokens=False)["input_ids"]) for c in together]
    speedup = single_s / batched_s
    # A batch decodes until its longest completion ends: the share of its decode steps that are useful work.
    b = args.batch_size
    useful = sum(tokens) / sum(max(tokens[i:i + b]) * len(tokens[i:i + b]) for i in range(0, n, b))
    figures = {"speedup": speedup, "facts_per_s_single": n / single_s, "facts_per_s_batched": n / batched_s,
               "mean_completion_tokens": sum(tokens) / n,
               "useful_decode_share": useful, "speedup_bound_early_stops": b * useful, "share_at_max_new_tokens": sum(t >= max_new for t in tokens) / n}
    md = table(["way", "facts", "seconds", "facts/s", "speed-up"],
               [["one fact at a time", n, single_s, n / single_s, 1.0],
                [f"batch {args.batch_size}", n, batched_s, n / batched_s, speedup]])
    notes = [f"outputs identical: yes ({n} greedy completions, max_new_tokens {max_new}, mean "
             f"{figures['mean_completion_tokens']:.0f} tokens, {figures['share_at_max_new_tokens']:.0%} cut at the limit)",
             f"goal >= 4x at batch 8: {speedup:.2f}x ({'met' if speedup >= 4 else 'NOT met'}); torch threads "
             f"{torch.get_num_threads()}",
             f"a batch decodes until its longest completion ends: {useful:.0%} of its decode steps are useful, "
             f"which caps the speed-up at ~{b * useful:.1f}x before any per-batch cost",
             f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)"]
    report("generation", "Batched generation vs one fact at a time", md,
           {"sizes": {"facts": n, "max_new_tokens": max_new, "batch_size": args.batch_size,
                      "torch_threads": torch.get_num_threads(), "model": str(model_dir)}, "figures": figures},
           args.quick, not args.no_mlflow, notes)


if __name__ == "__main__":
    main()
