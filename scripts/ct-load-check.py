#!/usr/bin/env python3
"""Loads a compressed-tensors checkpoint written by minitron-convert (for example a mixed
`w4a16:auto` one) with transformers + compressed-tensors, next to its bf16 original, and scores
both on one text: each quantization scheme's layer count as compressed-tensors applied it, then
mean KL-divergence and top-1 agreement of the quantized model against the original.

Needs torch, transformers and compressed-tensors (about 5.6 GB installed, so CI does not run it):
    python3 -m venv /tmp/ctvenv && /tmp/ctvenv/bin/pip install torch transformers compressed-tensors
    /tmp/ctvenv/bin/python scripts/ct-load-check.py BF16_DIR QUANT_DIR TEXT_FILE [TOKENS]
"""
import collections
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    bf16_dir, quant_dir, text_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    tok = AutoTokenizer.from_pretrained(bf16_dir)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[:, :n]
    ref = AutoModelForCausalLM.from_pretrained(bf16_dir, torch_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(quant_dir, torch_dtype=torch.float32)
    kinds = collections.Counter()
    for name, m in q.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is not None and s.weights is not None:
            w = s.weights
            kinds[f"int{w.num_bits} group {w.group_size}" if w.group_size else f"int{w.num_bits} channel"] += 1
        elif isinstance(m, torch.nn.Linear) and name != "lm_head":
            kinds["unquantized"] += 1
    print("linear layers as loaded:", dict(sorted(kinds.items())))
    with torch.no_grad():
        p = torch.log_softmax(ref(ids).logits[0].float(), -1)
        r = torch.log_softmax(q(ids).logits[0].float(), -1)
    kld = (p.exp() * (p - r)).sum(-1)
    top1 = (p.argmax(-1) == r.argmax(-1)).float().mean().item()
    print(f"{ids.shape[1]} tokens: mean KLD {kld.mean().item():.6f}, top-1 agreement {100 * top1:.2f} %")


if __name__ == "__main__":
    main()
