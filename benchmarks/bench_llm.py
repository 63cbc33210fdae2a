"""Item 2: the LLM, ours (models/llm.py + models/generation.py) vs transformers `LlamaForCausalLM`.

A 134M-parameter LLaMA (dim 768, 12 layers, 12 heads, SwiGLU 2048, vocab 32000), random weights
saved by HF and loaded through models/convert/llama.py, so both hold the same weights.
- prefill: one forward over (B, T) prompts, full logits (what a training/scoring pass computes);
- generation: greedy decoding of 64 new tokens at batch 4 with a KV cache (HF `generate`,
  use_cache=True, EOS disabled so both make exactly 64 tokens); the greedy ids are compared.
Both in fp32 and with both models' weights in bf16 (inference, as `pretrained.llm_dtype=bf16`
loads a frozen LLM), and ours with int8 linear weights (models/llm_int8.py, engine measured).

Targets: prefill time ours/HF <= 1.0; generation tokens/s ours/HF >= 1.5 (fp32).
Ratios are medians of interleaved rounds, with the min-max of the per-round ratios.

Why the figures are what they are, measured in the same run: prefill against the matmul peak of the
dtype (FLOPs / time); generation against the memory bandwidth (a decode step reads every weight:
weight bytes / bandwidth is the fastest a step can be). The last table times each fp32 kernel that
models/kernel_choice.py chooses between at decode shapes, the one it chose, and whether three
fresh measurements chose the same (a choice that flips is noise, and stays on F.linear).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import (
    add_thread_arg,
    flop_counter,
    footer,
    header,
    interleaved_runs,
    matmul_peak,
    memory_bandwidth,
    ratio_spread,
    table,
    verdict,
)

from expvl.models import kernel_choice
from expvl.models.convert.llama import load_hf_llama
from expvl.models.generation import GenerationConfig, generate
from expvl.models.llm_int8 import int8_engine, int8_linears

HF_CONFIG = {"vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 2048, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def compare(ours, hf, ids, prompt, *, new_tokens: int, repeats: int) -> dict:
    """Prefill and greedy generation of one (ours, HF) pair: interleaved runs, outputs, FLOPs."""
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        diff = (ours(input_ids=ids)["logits"].float() - hf(input_ids=ids).logits.float()).abs().max().item()
        pre = interleaved_runs({"ours": lambda: ours(input_ids=ids), "hf": lambda: hf(input_ids=ids, use_cache=False)},
                               repeats=repeats)
        counter = flop_counter()
        with counter:
            hf(input_ids=ids, use_cache=False)
    cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    out = {}

    def ours_gen():
        out["ours"] = generate(ours, input_ids=prompt, attention_mask=mask, config=cfg)["sequences"]

    def hf_gen():
        with torch.no_grad():
            out["hf"] = hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                    pad_token_id=0)[:, prompt.shape[1]:]

    gen = interleaved_runs({"ours": ours_gen, "hf": hf_gen}, repeats=max(2, repeats - 1))
    return {"pre": pre, "gen": gen, "diff": diff, "same": torch.equal(out["ours"], out["hf"]),
            "flops": counter.get_total_flops(), "ids": out["ours"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bf16 pair")
    add_thread_arg(ap)
    args = ap.parse_args()
    header("bench_llm: 134M LLaMA, ours vs transformers LlamaForCausalLM", args.threads)
    kernel_choice.choices.path = None  # measure this run's kernel choices afresh (in the untimed warm-up rounds)
    kernel_choice.choices.clear()
    import transformers
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_hf_llama(folder).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = sum(p.numel() for n, p in ours.named_parameters() if "embed_tokens" not in n) * 4
    engine = int8_engine(max((m for m in ours.model.layers.modules() if type(m) is torch.nn.Linear),
                             key=lambda m: m.weight.numel()))
    ours_int8 = int8_linears(ours, engine=engine)
    B = args.batch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (B, args.prefill_len), generator=g)
    prompt = torch.randint(3, 32000, (B, args.prompt_len), generator=g)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    bandwidth = memory_bandwidth()

    pairs = {"fp32": (ours, hf)}
    if not args.no_bf16:
        pairs["bf16"] = (copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(hf).to(torch.bfloat16))
    results = {name: compare(o, h, ids, prompt, new_tokens=args.new_tokens, repeats=args.repeats)
               for name, (o, h) in pairs.items()}
    mask = torch.ones_like(prompt)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    int8 = {}

    def int8_gen():
        int8["ids"] = generate(ours_int8, input_ids=prompt, attention_mask=mask, config=cfg)["sequences"]

    def hf_gen():
        with torch.no_grad():
            hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    int8_runs = interleaved_runs({"int8": int8_gen, "hf": hf_gen}, repeats=max(2, args.repeats - 1))
    agree = (int8["ids"] == results["fp32"]["ids"]).float().mean().item()

    tok = B * args.new_tokens
    steps = args.new_tokens
    rows, verdicts = [], []
    for name, r in results.items():
        pre_o, pre_h = median(r["pre"]["ours"]), median(r["pre"]["hf"])
        gen_o, gen_h = median(r["gen"]["ours"]), median(r["gen"]["hf"])
        rows.append([f"prefill {name} (ms)", pre_o * 1e3, pre_h * 1e3, ratio_spread(r["pre"], "ours", "hf"),
                     (f"{r['flops'] / pre_o / peaks[name]:.0%} / {r['flops'] / pre_h / peaks[name]:.0%} of the "
                      f"{name} peak; |logit diff| {r['diff']:.1e}")])
        bytes_ = weight_bytes // (2 if name == "bf16" else 1)
        rows.append([f"generate {name} (tokens/s)", tok / gen_o, tok / gen_h, ratio_spread(r["gen"], "hf", "ours"),
                     (f"weights read at {bytes_ * steps / gen_o / 1e9:.1f} / {bytes_ * steps / gen_h / 1e9:.1f} GB/s "
                      f"(bound {tok * bandwidth / (bytes_ * steps):.0f} tokens/s); ids equal: {r['same']}")])
        if name == "fp32":
            verdicts += [verdict("prefill time ours/HF, fp32", pre_o / pre_h, "<= 1.0", pre_o / pre_h <= 1.0),
                         verdict("generation tokens/s ours/HF, fp32", gen_h / gen_o, ">= 1.5", gen_h / gen_o >= 1.5)]
    i8, h8 = median(int8_runs["int8"]), median(int8_runs["hf"])
    rows.append([f"generate, ours int8 ({engine}) vs HF fp32 (tokens/s)", tok / i8, tok / h8,
                 ratio_spread(int8_runs, "hf", "int8"),
                 f"weights read at {weight_bytes / 4 * steps / i8 / 1e9:.1f} GB/s; ids equal to fp32: {100 * agree:.0f} %"])
    verdicts.append(verdict("generation tokens/s ours int8/HF fp32", h8 / i8, ">= 1.5", h8 / i8 >= 1.5))
    print(f"\n{n_params / 1e6:.0f}M parameters; prefill B={B} T={args.prefill_len}; generation B={B}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens; medians of {args.repeats} interleaved rounds, ratio = "
          "median (min-max) of the per-round ratios (time ours/HF for prefill, tokens/s ours/HF for generation)")
    print(f"matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
          f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(table(rows, ["measure", "ours", "HF", "ratio", "why"]))
    for line in verdicts:
        print(line)
    kernels(repeats=args.repeats)
    footer()


def kernels(*, repeats: int) -> None:
    """Each fp32 kernel of models/kernel_choice.py at decode and prefill shapes over weights larger than
    the caches, the kernel `linear` chose, and how many of three fresh measurements chose the same."""
    heads = [torch.randn(32000, 768)]                    # the lm_head: 98 MB
    mlps = [torch.randn(2048, 768) for _ in range(40)]   # 40 MLP-sized matrices: 252 MB
    names = [n for n in kernel_choice.LINEAR_KERNELS if n != "oneDNN" or kernel_choice._has_onednn()]
    rows = []
    for n in (1, 2, 4, 8, 16):
        x = torch.randn(n, 768)
        for label, ws in (("lm_head 32000x768", heads), ("40 x (2048x768)", mlps)):
            calls = {k: kernel_choice.no_grad(lambda k=k, x=x, ws=ws: [kernel_choice.LINEAR_KERNELS[k](x, w, None)
                                                                          for w in ws]) for k in names}
            t = {k: median(v) for k, v in interleaved_runs(calls, repeats=repeats).items()}
            picks = []
            for _ in range(3):
                kernel_choice.choices.clear()
                kernel_choice.choices.path = None  # fresh measurements, not the cached answer
                with torch.no_grad():
                    kernel = kernel_choice.linear_kernel(n, ws[0])
                picks.append(next(k for k, f in kernel_choice.LINEAR_KERNELS.items() if f is kernel))
            chosen = max(set(picks), key=picks.count)
            gb = sum(w.numel() * 4 for w in ws) / 1e9
            rows.append([f"{label}, {n} rows", *[t[k] * 1e3 for k in names], chosen, f"{picks.count(chosen)}/3",
                         t["F.linear"] / t[chosen], f"{gb / t[chosen]:.1f}"])
    print("\nfp32 linear kernels (ms): F.linear = x W^T (MKL, what transformers runs), W x^T = (W x^T)^T, oneDNN = "
          "its inner product;\nchosen = models/llm.py `linear` (kernel_choice, margin "
          f"{kernel_choice.choices.margin:.2f}), same = fresh measurements agreeing")
    print(table(rows, ["weights, input rows", *names, "chosen", "same", "speed-up vs F.linear", "GB/s"]))


if __name__ == "__main__":
    main()
