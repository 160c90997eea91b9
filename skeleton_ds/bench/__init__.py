"""How much faster a compact checkpoint answers than what users run today, measured in one process.

    skeleton-ds bench --shape llama-160m --lengths fixed,sst2 --data-dir ../shared/data \\
        --output runs/bench/llama-160m
    skeleton-ds bench --shape minilm --run-dir runs/minilm-sst2 --data-dir ../shared/data \\
        --output runs/bench/minilm
    skeleton-ds bench --shape llama3-8b --device cuda --dtype bf16 --output runs/bench/llama3-8b   # GPU only

Contenders, all answering the same inputs in the same process:
- `peft`: the full model with the same prompt through `peft` prompt tuning (PeftModel over the base
  model) run the fastest standard way its users have: under inference_mode, no generation cache
  (`use_cache=False`) and, on a decoder, the vocabulary computed at the last position only
  (`logits_to_keep=1`), the label logits picked from it; on an encoder the trained head on the mean
  of the text states (an encoder's PEFT forward computes no vocabulary);
- `peft-full-logits` (decoders, `--peft-full-logits`): the same PEFT call with the whole vocabulary
  at every position, as a plain CausalLM forward computes it (the contender of earlier tables);
- `full`: our Predictor on the full model (prompt cache, label-only logits);
- `compact-F[-hH]`: our Predictor on compact checkpoints at FFN keep F (and KV-group keep H), made by
  the real localize + convert code (random scores for random-weight shapes: speed does not depend on
  which neurons are kept; the run's attribution scores for a packaged model with `--run-dir`).
Inputs (`--lengths`): `fixed`, one batch of `--text-length` random tokens per example; `sst2`, the
token counts of real SST-2 dev sentences through the task template, cut into length-sorted batches as
the Predictor cuts them, so padding and batching costs show.
After a warm-up, each round times every contender once, in a rotated order, so drift and noise hit
all of them alike; the median and quartiles over rounds are reported. Each row also gets a roofline:
max(FLOPs / peak FLOP/s, bytes read / peak bandwidth), the peaks measured in the same process (a large
matmul in the run's dtype, a large copy), and the share of it the measured time reaches. The FLOP
ratio of two contenders is reported beside their speed-up, as a ratio (not a bound). The other decoder
shapes have random weights (speed does not need trained ones), so only the packaged models (`minilm`,
`smollm2-135m`, `qwen2.5-1.5b`) report accuracy.
"""

# One module per job, each importing only those listed before it: config (settings, shapes) < cost (FLOPs,
# bytes, peaks, roofline) < fixtures (checkpoints to time) < workloads (inputs) < contenders < timing <
# report (rows, costs per workload, tables) < run (tests/test_layout.py checks the order). The names below
# are the benchmark's API: the CLI, reproduce, the tests and launch/ use them.
from skeleton_ds.bench.config import LENGTHS, PACKAGED_READOUT, SHAPES, BenchConfig
from skeleton_ds.bench.contenders import Contender, build_contenders, layer_widths
from skeleton_ds.bench.cost import bytes_read, flop_breakdown, forward_flops, roofline_seconds
from skeleton_ds.bench.fixtures import compact_checkpoint, random_base, synthetic_prompt_dir
from skeleton_ds.bench.report import Machine, markdown_table, print_summary, summarize
from skeleton_ds.bench.run import run_bench
from skeleton_ds.bench.workloads import Workload, sst2_workload

__all__ = ["LENGTHS", "PACKAGED_READOUT", "SHAPES",
           "BenchConfig", "Contender", "Machine", "Workload", "build_contenders", "bytes_read",
           "compact_checkpoint", "flop_breakdown", "forward_flops", "layer_widths", "markdown_table",
           "print_summary", "random_base", "roofline_seconds", "run_bench", "sst2_workload", "summarize",
           "synthetic_prompt_dir"]
