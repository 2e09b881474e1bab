#!/usr/bin/env bash
# Decode and short-prompt prefill speed of the synthetic 4.5 B model on a GPU with nothing else
# running on the host (gpu-check.sh converts in the background while it measures, and decode is
# bound by the host thread that issues the kernels). Each format is converted, then timed twice.
#
#   scripts/gpu-decode.sh [BIN_DIR]      (default: target/gpu-bundle; run on the GPU host)
set -u
cd "$(dirname "$0")/.."
B=${1:-target/gpu-bundle}; W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; mkdir -p $W; export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64; nvidia-smi --query-gpu=name --format=csv,noheader; nproc
$B/minitron-convert synth --preset minitron-4b-depth --seed 1 --out $W/big --force >/dev/null 2>&1 || echo synth failed
d() { for i in 1 2; do $B/minitron-verify $1 --gen fixtures/prompts.txt --tokens 128 --device cuda --dtype bf16 --json 2>$W/err | python3 -c "import json,sys; g=json.load(sys.stdin)['gen']; print('$2 run $i: decode', round(g['decode_tokens_per_s'],1), 'tok/s, prefill', round(g['prefill_tokens_per_s'],1))" || tail -3 $W/err; done; }
d $W/big bf16
for t in fp8 gguf:q4_k_m w4a16 int8 nvfp4; do a=$W/${t/:/-}; case $t in gguf:*) a=$a.gguf;; esac; x=; case $t in int8|nvfp4) x="--calib-samples 2 --calib-seq 256";; esac; $B/minitron-convert $W/big --to $t $x --out $a --force >/dev/null 2>&1 || echo "convert $t failed"; d $a $t; rm -rf $a; done
