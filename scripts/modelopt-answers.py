#!/usr/bin/env python3
"""Regenerates fixtures/modelopt-smollm2.json: what ModelOpt's unified HF export writes for
SmolLM2-135M under NVFP4_DEFAULT_CFG, recorded as the sha256 of every weight-side tensor
(`weight`, `weight_scale`, `weight_scale_2`; the `input_scale`s come from ModelOpt's own forward
pass and are not compared), every tensor's dtype and shape, config.json's quantization_config
and hf_quant_config.json (producer versions removed).

Not run by CI (it needs torch and nvidia-modelopt). Recorded with nvidia-modelopt 0.47.0,
torch 2.14.0, transformers 5.17.0 (CPU), calibrated on the first 8 × 512 tokens of the text:

    /tmp/lc/bin/pip install nvidia-modelopt
    /tmp/lc/bin/python scripts/modelopt-answers.py ~/.cache/minitron-assets/smollm2-135m \
        ../shared/data/wikitext2-valid.txt fixtures/modelopt-smollm2.json
"""
import hashlib, json, sys, tempfile

import modelopt.torch.quantization as mtq
import torch
from modelopt.torch.export import export_hf_checkpoint
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

src, text_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
ids = AutoTokenizer.from_pretrained(src)(open(text_path).read())["input_ids"]
rows = [ids[i * 512:(i + 1) * 512] for i in range(8)]


def loop(m):
    with torch.no_grad():
        for r in rows:
            m(torch.tensor([r]))


model = mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
with tempfile.TemporaryDirectory() as d:
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=d)
    tensors = {}
    with safe_open(f"{d}/model.safetensors", "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_slice(name)
            entry = {"dtype": t.get_dtype(), "shape": t.get_shape()}
            if name.rsplit(".", 1)[1] in ("weight", "weight_scale", "weight_scale_2"):
                raw = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                entry["sha256"] = hashlib.sha256(raw).hexdigest()
            tensors[name] = entry
    config = json.load(open(f"{d}/config.json"))["quantization_config"]
    hq = json.load(open(f"{d}/hf_quant_config.json"))
for c in (config, hq):
    c.pop("producer", None)
answers = {"producer": "nvidia-modelopt 0.47.0, torch 2.14.0, transformers 5.17.0 (CPU)",
           "quantization_config": config, "hf_quant_config": hq, "tensors": tensors}
json.dump(answers, open(out_path, "w"), indent=1, sort_keys=True)
open(out_path, "a").write("\n")
