"""Benchmark: analysis time of Hugging Face transformers models at full size (random init, CPU).

Run: python -m benchmarks.bench_real_models [bert_base vit_b16 gpt2 mobilevit_small swin_tiny t5_small_encoder llama_tiny]
(needs transformers: pip install 'mudsc[hf]'; default: bert_base vit_b16)
Target: under 5 s each on 2 CPU cores, torch.export included. Prints, per model, the first analysis
in a fresh process (what one ``mudsc merge`` pays) and a second one, with the time of each pass.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from benchmarks import ROOT

MODELS = {
    # name: (model class, config class, config options, inputs builder)
    "bert_base": ("BertModel", "BertConfig", {}, "text"),
    "vit_b16": ("ViTForImageClassification", "ViTConfig", {}, "image"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}, "text"),
    "mobilevit_small": ("MobileViTForImageClassification", "MobileViTConfig", {}, "image"),
    "swin_tiny": ("SwinForImageClassification", "SwinConfig", {}, "image"),
    "t5_small_encoder": ("T5EncoderModel", "T5Config", {}, "text"),
    "llama_tiny": ("LlamaForCausalLM", "LlamaConfig",
                   dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000), "text"),
}


def _inputs(kind: str, cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        return {"input_ids": torch.randint(0, cfg.vocab_size, (2, 32), generator=g), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    return {"pixel_values": torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)}


def run_one(name: str) -> None:
    import transformers

    from mudsc_graph import analyze_full

    torch.set_num_threads(2)
    model_cls, cfg_cls, options, kind = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**options)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = getattr(transformers, model_cls)(cfg).eval()
    build = time.perf_counter() - t0
    inputs = _inputs(kind, cfg)
    for label in ("first", "second"):
        t0 = time.perf_counter()
        result = analyze_full(model, inputs)
        total = time.perf_counter() - t0
        passes = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(
            f"{name:>11} ({label:>6}): analysis {total:.2f} s  ({passes})  tracer {result.tracer}  nodes {result.graph.number_of_nodes()}  "
            f"groups {len(result.spec.free_groups())}  permutable units {result.spec.permutable_units}"
            + (f"  [model built in {build:.1f} s, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters]" if label == "first" else "")
        )


def main(names: list[str]) -> None:
    for name in names:  # one process each: the first analysis includes torch.export's warm-up, as a user's run does
        subprocess.run([sys.executable, "-m", "benchmarks.bench_real_models", "--one", name], check=True, cwd=ROOT)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_real_models", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["bert_base", "vit_b16"], metavar="MODEL",
                        help=f"default: bert_base vit_b16; choose from {' '.join(MODELS)}")
    parser.add_argument("--one", metavar="MODEL", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {' '.join(unknown)}; choose from {' '.join(MODELS)}")
    if args.one:
        run_one(args.one)
    else:
        main(args.models)
