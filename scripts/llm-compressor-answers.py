#!/usr/bin/env python3
"""Regenerates fixtures/llm-compressor-smollm2.json: what llm-compressor writes for SmolLM2-135M
under NVFP4A16, NVFP4 (weights only: its input scales depend on its own forward pass) and W4A16
with groups of 64 (SmolLM2's widths are not multiples of 128), recorded as the sha256 of every
quantized tensor and the quantization_config.

Not run by CI (it needs torch and llm-compressor, several GB). Recorded with llmcompressor
0.14.0.1, compressed-tensors 0.19.0, torch 2.14.0 (CPU):

    python3 -m venv /tmp/lc && /tmp/lc/bin/pip install llmcompressor
    /tmp/lc/bin/python scripts/llm-compressor-answers.py ~/.cache/minitron-assets/smollm2-135m \
        ../shared/data/wikitext2-valid.txt fixtures/llm-compressor-smollm2.json
"""
import hashlib, json, sys, tempfile

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

src, text_path, out_path = sys.argv[1:4]
QUANTIZED = ("weight_packed", "weight_scale", "weight_global_scale", "weight_shape")


def run(scheme, out):
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    kw = {}
    if scheme == "W4A16_G64":
        args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=64,
                                symmetric=True, dynamic=False)
        recipe = QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
            ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    if scheme == "NVFP4":
        from datasets import Dataset
        ids = AutoTokenizer.from_pretrained(src)(open(text_path).read())["input_ids"]
        rows = [ids[i * 512:(i + 1) * 512] for i in range(8)]
        kw = dict(dataset=Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 512] * 8}),
                  num_calibration_samples=8, max_seq_length=512)
    oneshot(model=model, recipe=recipe, **kw)
    model.save_pretrained(out, save_compressed=True)
    tensors = {}
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        for name in sorted(f.keys()):
            if name.rsplit(".", 1)[1] in QUANTIZED:
                t = f.get_slice(name)
                raw = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                tensors[name] = {"dtype": t.get_dtype(), "shape": t.get_shape(),
                                 "sha256": hashlib.sha256(raw).hexdigest()}
    config = json.load(open(f"{out}/config.json"))["quantization_config"]
    return {"quantization_config": config, "tensors": tensors}


answers = {"producer": "llmcompressor 0.14.0.1, compressed-tensors 0.19.0, torch 2.14.0 (CPU)"}
for scheme in ["NVFP4A16", "NVFP4", "W4A16_G64"]:
    with tempfile.TemporaryDirectory() as d:
        answers[scheme] = run(scheme, d)
json.dump(answers, open(out_path, "w"), indent=1, sort_keys=True)
open(out_path, "a").write("\n")
