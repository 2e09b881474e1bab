#!/usr/bin/env bash
# One prepared check for a bare GPU host (CUDA 13.0 driver, nvcc and PyTorch installed, no
# network, no Rust): runs the binaries built by scripts/build-cuda.sh.
#
#   scripts/gpu-check.sh OUT_DIR [BIN_DIR]      (BIN_DIR default: target/gpu-bundle)
#
# (a) the tiny fixture on CPU and on CUDA: perplexity and the first chunk's logits;
# (b) a synthetic minitron-4b-depth checkpoint generated here, bf16 on CUDA;
# (c) its fp8, int8 and gguf:q4_k_m artifacts made here, on CUDA; the tiny fixture as NVFP4 on
# both devices.
# Prints one table (ppl, prefill and decode tokens/s, peak GPU memory) and writes it, the
# JSON reports and the logs into OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR [BIN_DIR]}
BIN=${2:-target/gpu-bundle}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu-check.log
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

# --- CUDA libraries: ldconfig, /usr/local/cuda*, the Python environment's nvidia packages.
dirs=()
for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13 libcublasLt.so.13; do
  p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}')
  [ -n "$p" ] && dirs+=("$(dirname "$p")")
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
py=$(command -v python3 || true)
if [ -n "$py" ]; then
  while IFS= read -r d; do [ -n "$d" ] && dirs+=("$d"); done < <("$py" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    for base in list(nvidia.__path__):
        for d in sorted(set(os.path.dirname(p) for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True))):
            print(d)
except Exception:
    pass
PY
)
fi
LD=$(printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd: -)
export LD_LIBRARY_PATH=${LD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
missing=$(ldd "$BIN/minitron-verify" | grep "not found" || true)
if [ -n "$missing" ]; then
  say "minitron-verify cannot find: $missing"
  exit 1
fi
V=$BIN/minitron-verify
C=$BIN/minitron-convert
TEXT=src/model/default_corpus.txt
PROMPTS=fixtures/prompts.txt
W=${GPU_CHECK_WORK:-/tmp/minitron-gpu-check}
mkdir -p "$W"

# Peak GPU memory of one command, sampled every 100 ms.
peak_mem() {
  local f=$W/mem.$$; : > "$f"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
  local s=$!
  "$@"; local rc=$?
  kill $s 2>/dev/null; wait $s 2>/dev/null
  PEAK=$(sort -n "$f" | tail -n 1); PEAK=${PEAK:-?}
  return $rc
}

# The table grows row by row, so a run cut short still leaves what it measured.
TABLE=$OUT/table.md
{
  echo "| run | ppl | prefill tokens/s (ppl chunks) | prefill tokens/s (prompts) | decode tokens/s | peak GPU memory |"
  echo "|---|---|---|---|---|---|"
} > "$TABLE"
row() { # name report.json peak
  "${py:-python3}" - "$2" "$1" "$3" <<'PY' | tee -a "$TABLE"
import json, sys
r = json.load(open(sys.argv[1]))
nan = float("nan")
pp = r.get("ppl", {})
p = pp.get("perplexity", {}).get("ppl", nan)
g = r.get("gen", {})
print(f"| {sys.argv[2]} | {p:.4f} | {pp.get('tokens_per_s', nan):.0f} | {g.get('prefill_tokens_per_s', nan):.0f} "
      f"| {g.get('decode_tokens_per_s', nan):.1f} | {sys.argv[3]} MiB |")
PY
}

# --- (a) tiny fixture, CPU vs CUDA.
say "tiny fixture: CPU"
"$V" fixtures/tiny-llama3 --ppl "$TEXT" --ctx 64 --chunks 8 --gen "$PROMPTS" --tokens 16 \
  --device cpu --dump-logits "$W/tiny-cpu.f32" --report "$OUT/tiny-cpu.json" > "$OUT/tiny-cpu.txt"
say "tiny fixture: CPU, bf16 numerics"
"$V" fixtures/tiny-llama3 --ppl "$TEXT" --ctx 64 --chunks 8 --device cpu --dtype bf16 \
  --dump-logits "$W/tiny-cpu-bf16.f32" --report "$OUT/tiny-cpu-bf16.json" > "$OUT/tiny-cpu-bf16.txt"
say "tiny fixture: CUDA"
peak_mem "$V" fixtures/tiny-llama3 --ppl "$TEXT" --ctx 64 --chunks 8 --gen "$PROMPTS" --tokens 16 \
  --device cuda --dump-logits "$W/tiny-cuda.f32" --report "$OUT/tiny-cuda.json" > "$OUT/tiny-cuda.txt"
row "tiny, CPU f32" "$OUT/tiny-cpu.json" "-"
row "tiny, CUDA bf16" "$OUT/tiny-cuda.json" "$PEAK"
"${py:-python3}" - "$W/tiny-cpu.f32" "$W/tiny-cuda.f32" "$OUT/tiny-cpu.json" "$OUT/tiny-cuda.json" "$W/tiny-cpu-bf16.f32" <<'PY' | tee "$OUT/tiny-compare.txt"
import json, sys
from array import array
def load(p):
    a = array("f")
    with open(p, "rb") as f:
        a.frombytes(f.read())
    if sys.byteorder != "little":
        a.byteswap()
    return a
def maxdiff(x, y):
    return max(abs(u - v) for u, v in zip(x, y))
a, b, c = load(sys.argv[1]), load(sys.argv[2]), load(sys.argv[5])
# The same bf16 numerics on the CPU: separates bf16 rounding from device differences.
print(f"tiny CUDA vs CPU --dtype bf16: max |Δlogit| {maxdiff(c, b):.3e}; CPU bf16 vs CPU f32: {maxdiff(c, a):.3e}")
pa = json.load(open(sys.argv[3]))["ppl"]["perplexity"]["ppl"]; pb = json.load(open(sys.argv[4]))["ppl"]["perplexity"]["ppl"]
d = maxdiff(a, b)
rel = 100 * abs(pb / pa - 1)
print(f"tiny CPU vs CUDA: max |Δlogit| {d:.3e} (bound 2e-2), ppl {pa:.4f} vs {pb:.4f} ({rel:.3f} %, bound 0.2 %)")
print("PASS" if d < 2e-2 and rel < 0.2 else "FAIL")
PY

# --- (a2) tiny fixture as NVFP4 (weights and activations), CPU vs CUDA: the CUDA form holds
# the weights dense in bf16 and rounds the activations on the host, so only bf16 rounding
# should separate the two.
say "tiny nvfp4: CPU vs CUDA"
if "$C" fixtures/tiny-llama3 --to nvfp4 --calib-samples 4 --calib-seq 64 --out "$W/tiny-nvfp4" \
     --force > "$OUT/convert-tiny-nvfp4.txt" 2>&1 \
   && "$V" "$W/tiny-nvfp4" --ppl "$TEXT" --ctx 64 --chunks 8 --device cpu \
     --report "$OUT/tiny-nvfp4-cpu.json" > "$OUT/tiny-nvfp4-cpu.txt" 2>&1 \
   && peak_mem "$V" "$W/tiny-nvfp4" --ppl "$TEXT" --ctx 64 --chunks 8 --device cuda \
     --report "$OUT/tiny-nvfp4-cuda.json" > "$OUT/tiny-nvfp4-cuda.txt" 2>&1; then
  row "tiny nvfp4, CPU" "$OUT/tiny-nvfp4-cpu.json" "-"
  row "tiny nvfp4, CUDA" "$OUT/tiny-nvfp4-cuda.json" "$PEAK"
else
  say "tiny nvfp4 FAILED (see $OUT/*tiny-nvfp4*.txt)"
fi

# --- (b) synthetic 4.5 B checkpoint, bf16 on CUDA.
say "synth minitron-4b-depth"
"$C" synth --preset minitron-4b-depth --seed 1 --out "$W/big" --force > "$OUT/synth.txt"
say "bf16 on CUDA"
peak_mem "$V" "$W/big" --ppl "$TEXT" --ctx 512 --chunks 8 --gen "$PROMPTS" --tokens 128 --device cuda --report "$OUT/big-bf16.json" > "$OUT/big-bf16.txt"
row "4.5B bf16" "$OUT/big-bf16.json" "$PEAK"

# --- (c) artifacts made here.
say "convert fp8"
"$C" "$W/big" --to fp8 --out "$W/big-fp8" --force > "$OUT/convert-fp8.txt"
peak_mem "$V" "$W/big-fp8" --ppl "$TEXT" --ctx 512 --chunks 8 --gen "$PROMPTS" --tokens 128 --device cuda --report "$OUT/big-fp8.json" > "$OUT/big-fp8.txt"
row "4.5B fp8" "$OUT/big-fp8.json" "$PEAK"
# FP8 held as E4M3 bytes on the device; KLD against bf16 with both models streamed block by block.
say "fp8 KLD vs bf16 (streamed)"
peak_mem "$V" "$W/big-fp8" --reference "$W/big" --kld --ppl "$TEXT" --ctx 512 --chunks 4 --device cuda --report "$OUT/big-fp8-kld.json" > "$OUT/big-fp8-kld.txt"
say "fp8 KLD: $(grep -E '^KLD' "$OUT/big-fp8-kld.txt"), peak GPU memory $PEAK"
rm -rf "$W/big-fp8"
say "convert gguf:q4_k_m"
"$C" "$W/big" --to gguf:q4_k_m --out "$W/big-q4_k_m.gguf" --force > "$OUT/convert-q4km.txt"
peak_mem "$V" "$W/big-q4_k_m.gguf" --ppl "$TEXT" --ctx 512 --chunks 8 --gen "$PROMPTS" --tokens 128 --device cuda --report "$OUT/big-q4km.json" > "$OUT/big-q4km.txt"
row "4.5B gguf:q4_k_m" "$OUT/big-q4km.json" "$PEAK"

rm -f "$W/big-q4_k_m.gguf"
say "convert int8"
"$C" "$W/big" --to int8 --calib-samples 2 --calib-seq 256 --out "$W/big-int8" --force > "$OUT/convert-int8.txt"
peak_mem "$V" "$W/big-int8" --ppl "$TEXT" --ctx 512 --chunks 8 --gen "$PROMPTS" --tokens 128 --device cuda --report "$OUT/big-int8.json" > "$OUT/big-int8.txt"
row "4.5B int8" "$OUT/big-int8.json" "$PEAK"
rm -rf "$W/big-int8"
cat "$OUT/tiny-compare.txt" >> "$TABLE"
say "done"
cat "$TABLE"
