#!/usr/bin/env bash
# One prepared check for a bare GPU host (CUDA 13.0 driver, Python, no network, no Rust), run
# with the binaries built by scripts/build-cuda.sh; or, with --rehearse, the same steps on this
# machine's CPU (the GPU forms through their CPU twins, `--emulate-gpu-forms`) on the tiny
# fixture and a small synthetic, so the script itself is tested before a GPU sees it.
#
#   scripts/gpu-check.sh [--rehearse] OUT_DIR [BIN_DIR]     (BIN_DIR default: target/gpu-bundle)
#
# Steps, each with its own timeout and exit status (a failed step fails what depends on it and
# the script's exit status; the others still run):
#  (a) tiny fixture as every artifact type: the GPU against the CPU `--dtype bf16` path, with
#      max |Δlogit|, Δppl and greedy tokens each gated by a bound;
#  (b) the synthetic 4.5 B minitron-4b-depth (made here; in a rehearsal a second tiny model):
#      bf16, fp8, int8, w4a16, nvfp4, gguf:q4_k_m, converted in the background while the GPU
#      runs: ppl (8 × 512), a 2,048-token prefill, 128-token decode, peak GPU memory; the KLD
#      of fp8 against bf16.
# Writes into OUT_DIR: table.md (printed last), summary.json, logs.tar.gz, gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
OUT=${1:?usage: scripts/gpu-check.sh [--rehearse] OUT_DIR [BIN_DIR]}
BIN=${2:-target/gpu-bundle}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d "${TMPDIR:-/tmp}/minitron-gpu-check.XXXXXX")
mkdir -p "$W/logs"
exec > >(tee "$OUT/gpu-check.log") 2>&1
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
PY=$(command -v python3 || command -v python)
V=$BIN/minitron-verify
C=$BIN/minitron-convert
TEXT=src/model/default_corpus.txt
PROMPTS=fixtures/prompts.txt
STEPS=$W/steps.tsv
: > "$STEPS"
FAILED=0

finish() {
  tar -czf "$OUT/logs.tar.gz" -C "$W" logs steps.tsv 2>/dev/null
  "$PY" - "$W" "$OUT" "$REHEARSE" <<'PY'
import json, os, sys
w, out, rehearse = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
steps = [l.rstrip("\n").split("\t") for l in open(os.path.join(w, "steps.tsv")) if l.strip()]
rows = [json.loads(l) for l in open(os.path.join(w, "rows.jsonl"))] if os.path.exists(os.path.join(w, "rows.jsonl")) else []
json.dump({"rehearsal": rehearse, "steps": [{"step": s[0], "rc": int(s[1]), "seconds": float(s[2])} for s in steps], "rows": rows},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
  rm -rf "$W"
}
trap finish EXIT

# step NAME TIMEOUT_S CMD...: runs CMD with its output in logs/NAME.log, records rc and seconds.
step() {
  local name=$1 limit=$2; shift 2
  local s; s=$(date +%s%N)
  if [ "$1" = with_peak ]; then
    shift
    with_peak timeout "$limit" "$@" > "$W/logs/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$W/logs/$name.log" 2>&1
  fi
  local rc=$?
  local ms=$(( ($(date +%s%N) - s) / 1000000 ))
  printf '%s\t%s\t%d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >> "$STEPS"
  if [ "$rc" != 0 ]; then
    FAILED=1
    say "FAILED ($rc): $name — last lines of its log:"
    tail -n 5 "$W/logs/$name.log" | sed 's/^/    /'
  else
    say "ok: $name"
  fi
  return "$rc"
}

if [ "$REHEARSE" = 1 ]; then
  DEV=(--device cpu --emulate-gpu-forms)
  BIG_PRESET=tiny; BIG_CTX=128; BIG_CHUNKS=4; PREFILL_CTX=256; DECODE=16
  say "REHEARSAL on the CPU: GPU forms through their CPU twins"
else
  DEV=(--device cuda)
  BIG_PRESET=minitron-4b-depth; BIG_CTX=512; BIG_CHUNKS=8; PREFILL_CTX=2048; DECODE=128
  # CUDA libraries: ldconfig, /usr/local/cuda*, the Python environment's nvidia packages.
  dirs=()
  for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13 libcublasLt.so.13; do
    p=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}')
    [ -n "$p" ] && dirs+=("$(dirname "$p")")
  done
  for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && dirs+=("$d")
  done
  while IFS= read -r d; do [ -n "$d" ] && dirs+=("$d"); done < <("$PY" - <<'PY' 2>/dev/null
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
  LD=$(printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd: -)
  export LD_LIBRARY_PATH=${LD}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  missing=$(ldd "$V" | grep "not found" || true)
  if [ -n "$missing" ]; then say "minitron-verify cannot find: $missing"; exit 1; fi
  ldd "$V" | grep -E 'cu|nvrtc' || true
fi

# Peak GPU memory of one command (MiB, sampled every 100 ms; "-" in a rehearsal).
PEAK=-
with_peak() {
  PEAK=-
  if [ "$REHEARSE" = 1 ]; then "$@"; return $?; fi
  local f=$W/mem.txt; : > "$f"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
  local s=$!
  "$@"; local rc=$?
  kill $s 2>/dev/null; wait $s 2>/dev/null
  PEAK=$(sort -n "$f" | tail -n 1); PEAK=${PEAK:--}
  return $rc
}

# row KIND NAME [args for the comparison]: one line of rows.jsonl from the reports.
row() {
  "$PY" - "$W" "$@" <<'PY'
import json, os, sys
from array import array
w, kind, name = sys.argv[1], sys.argv[2], sys.argv[3]
def rep(p):
    try:
        return json.load(open(p))
    except Exception:
        return {}
def ppl(r):
    return (r.get("ppl") or {}).get("perplexity", {}).get("ppl")
r = {"kind": kind, "name": name, "diagnostic": os.environ.get("DIAG") == "1"}
def maxdiff(p, q):
    a, b = array("f"), array("f")
    try:
        a.frombytes(open(p, "rb").read()); b.frombytes(open(q, "rb").read())
        return max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) and len(a) else None
    except Exception:
        return None
if kind == "tiny":
    cpu, dev, bound = rep(sys.argv[4]), rep(sys.argv[5]), float(sys.argv[8])
    d = maxdiff(sys.argv[6], sys.argv[7])
    pa, pb, p32 = ppl(cpu), ppl(dev), ppl(rep(sys.argv[9]))
    dp = 100 * abs(pb / pa - 1) if pa and pb else None
    # Noise floor: the CPU's f32 form against its bf16 form; bounds are at least twice it.
    floor_d = maxdiff(sys.argv[6], sys.argv[10]) or 0.0
    floor_p = 100 * abs(p32 / pa - 1) if pa and p32 else 0.0
    bound = max(bound, 2 * floor_d)
    pbound = max(0.05, 2 * floor_p)
    cp = (cpu.get("gen") or {}).get("prompts", [])
    ga = [p.get("candidate") for p in cp]
    gb = [p.get("candidate") for p in (dev.get("gen") or {}).get("prompts", [])]
    same = sum(x == y for x, y in zip(ga, gb)) if ga and len(ga) == len(gb) else None
    # A path that leaves the CPU's at a step where the CPU's top-2 margin is within the logit
    # bound left at a near-tie (summation order alone can pick either token): counted apart.
    ties, tie_margins = 0, []
    for p, x, y in zip(cp, ga, gb):
        if x != y and x and y:
            i = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None)
            m = (p.get("candidate_margins") or [None] * len(x))[i] if i is not None else None
            if m is not None and m <= bound:
                ties += 1
                tie_margins.append(m)
    r.update(ppl_cpu=pa, ppl_dev=pb, dppl_pct=dp, max_dlogit=d, logit_bound=bound,
             dppl_bound=pbound, floor_dlogit=floor_d, floor_dppl_pct=floor_p,
             greedy_same=same, greedy_of=len(ga), greedy_ties=ties, tie_margins=tie_margins)
    r["pass"] = (d is not None and d <= bound and dp is not None and dp <= pbound
                 and same is not None and same + ties == len(ga))
else:
    run, pre = rep(sys.argv[4]), rep(sys.argv[5])
    g = run.get("gen") or {}
    r.update(ppl=ppl(run), ppl_tokens_per_s=(run.get("ppl") or {}).get("tokens_per_s"),
             prefill_tokens_per_s=(pre.get("ppl") or {}).get("tokens_per_s"),
             decode_tokens_per_s=g.get("decode_tokens_per_s"), peak_mib=sys.argv[6])
    if len(sys.argv) > 7:
        k = rep(sys.argv[7]).get("kld") or {}
        r["kld_vs_bf16"] = (k.get("divergence") or {}).get("mean_kld")
    r["pass"] = r["ppl"] is not None
open(os.path.join(w, "rows.jsonl"), "a").write(json.dumps(r) + "\n")
PY
}

# ---- (a) the tiny fixture as every artifact type, GPU form against the CPU's bf16 path.
TYPES="bf16 fp8 fp8-static int8 int8-w8a16 w4a16 nvfp4 nvfp4-a16 gguf:q8_0 gguf:q4_k_m"
calib_for() { case $1 in fp8-static|int8|nvfp4) echo "--calib-samples 4 --calib-seq 64";; esac; }
# Bounds on max |Δlogit|: products are exact in both, so only f32 summation order differs;
# with activation codes (fp8, int8, nvfp4) one code may land on the other side of a rounding
# boundary, which moves that activation by one grid step.
bound_for() { case $1 in fp8|fp8-static|int8|nvfp4) echo 0.1;; *) echo 0.02;; esac; }
# tiny_row NAME ARTIFACT BOUND [CPU and device options...]: CPU bf16, CPU f32 (the noise floor)
# and the device on one artifact, then its row. Options after BOUND go to all three runs.
tiny_row() {
  local n=$1 art=$2 bound=$3 name=$4; shift 4
  local common=(--ppl "$TEXT" --ctx 64 --chunks 8 --gen "$PROMPTS" --tokens 16 --dtype bf16 "$@")
  step "cpu-$n" 120 "$V" "$art" "${common[@]}" --device cpu \
    --dump-logits "$W/$n.cpu.f32" --report "$W/$n.cpu.json" || return 1
  # The CPU's own f32 and bf16 forms differ only in summation order (and the f32 stream's
  # roundings): that difference is this artifact's noise floor, and a bound below it would
  # fail on noise (a per-token FP8 scale moves with one ulp of its row's absmax).
  step "cpu32-$n" 120 "$V" "$art" --ppl "$TEXT" --ctx 64 --chunks 8 --dtype f32 --device cpu "$@" \
    --dump-logits "$W/$n.cpu32.f32" --report "$W/$n.cpu32.json" || return 1
  step "dev-$n" 120 with_peak "$V" "$art" "${common[@]}" "${DEV[@]}" \
    --dump-logits "$W/$n.dev.f32" --report "$W/$n.dev.json" || return 1
  row tiny "$name" "$W/$n.cpu.json" "$W/$n.dev.json" "$W/$n.cpu.f32" "$W/$n.dev.f32" "$bound" \
    "$W/$n.cpu32.json" "$W/$n.cpu32.f32"
}
for t in $TYPES; do
  n=tiny-${t/:/-}
  art=fixtures/tiny-llama3
  if [ "$t" != bf16 ]; then
    art=$W/$n; case $t in gguf:*) art=$art.gguf;; esac
    # shellcheck disable=SC2046
    step "convert-$n" 120 "$C" fixtures/tiny-llama3 --to "$t" $(calib_for "$t") --out "$art" --force || continue
  fi
  tiny_row "$n" "$art" "$(bound_for "$t")" "$t"
done
# Diagnostics that tell the tensor cores' and candle's arithmetic from ours (informational
# rows, gated like the others): FP8 static with every GEMM widened to bf16 (exact products,
# f32 sums) instead of cuBLASLt FP8, and GGUF dequantized to dense weights on both sides
# instead of candle's quantized kernels (q8_1 activations on a GPU, Q8_K/Q8_0 on the CPU).
if [ -d "$W/tiny-fp8-static" ]; then
  DIAG=1 MINITRON_GPU_GEMM=native tiny_row diag-fp8-static-native "$W/tiny-fp8-static" 0.1 \
    "(diagnostic) fp8-static, cuBLASLt FP8 GEMM"
fi
if [ -f "$W/tiny-gguf-q8_0.gguf" ]; then
  DIAG=1 tiny_row diag-q8_0-dense "$W/tiny-gguf-q8_0.gguf" 0.02 "(diagnostic) gguf:q8_0, dense both" --gguf-dense
fi

# ---- (b) the synthetic model: conversions in the background while the device runs.
if step synth-big 300 "$C" synth --preset "$BIG_PRESET" --seed 1 --out "$W/big" --force; then
  BIG_TYPES="fp8 int8 w4a16 nvfp4 gguf:q4_k_m"
  CONVERT_THREADS=$(( $(nproc) > 6 ? $(nproc) - 4 : 2 ))
  (
    for t in $BIG_TYPES; do
      n=big-${t/:/-}; art=$W/$n; case $t in gguf:*) art=$art.gguf;; esac
      extra=; case $t in int8|nvfp4) extra="--calib-samples 2 --calib-seq 256";; esac
      # shellcheck disable=SC2086
      # Niced and four cores short: decode speed is bound by the host thread that issues the
      # GPU's kernels, and conversions on every core moved it by a third between runs.
      timeout 300 nice -n 19 "$C" "$W/big" --to "$t" $extra --threads "$CONVERT_THREADS" \
        --out "$art" --force > "$W/logs/convert-$n.log" 2>&1
      echo $? > "$W/$n.rc"
    done
  ) &
  bg=$!
  run_big() { # name artifact
    local n=$1 art=$2
    step "run-$n" 240 with_peak "$V" "$art" --ppl "$TEXT" --ctx "$BIG_CTX" --chunks "$BIG_CHUNKS" \
      --gen "$PROMPTS" --tokens "$DECODE" "${DEV[@]}" --dtype bf16 --report "$W/$n.json" || return 1
    local peak=$PEAK
    step "prefill-$n" 120 "$V" "$art" --ppl "$TEXT" --ctx "$PREFILL_CTX" --chunks 1 "${DEV[@]}" \
      --dtype bf16 --report "$W/$n.prefill.json" || return 1
    PEAK=$peak
  }
  run_big big-bf16 "$W/big" && row big bf16 "$W/big-bf16.json" "$W/big-bf16.prefill.json" "$PEAK"
  for t in $BIG_TYPES; do
    n=big-${t/:/-}; art=$W/$n; case $t in gguf:*) art=$art.gguf;; esac
    while [ ! -f "$W/$n.rc" ] && kill -0 $bg 2>/dev/null; do sleep 1; done
    rc=$(cat "$W/$n.rc" 2>/dev/null || echo 1)
    printf '%s\t%s\t%s\n' "convert-$n" "$rc" "0" >> "$STEPS"
    if [ "$rc" != 0 ]; then FAILED=1; say "FAILED ($rc): convert-$n"; continue; fi
    if run_big "$n" "$art"; then
      peak=$PEAK
      if [ "$t" = fp8 ]; then
        step kld-big-fp8 240 "$V" "$art" --reference "$W/big" --kld --ppl "$TEXT" --ctx "$BIG_CTX" \
          --chunks 4 "${DEV[@]}" --dtype bf16 --report "$W/big-fp8.kld.json"
        row big "$t" "$W/$n.json" "$W/$n.prefill.json" "$peak" "$W/big-fp8.kld.json"
      else
        row big "$t" "$W/$n.json" "$W/$n.prefill.json" "$peak"
      fi
    fi
    rm -rf "$art"
  done
  wait $bg
fi

# ---- The table, last.
"$PY" - "$W" "$REHEARSE" <<'PY' | tee "$OUT/table.md"
import json, os, sys
w, rehearse = sys.argv[1], sys.argv[2] == "1"
f = lambda v, p=4: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
rows = [json.loads(l) for l in open(os.path.join(w, "rows.jsonl"))] if os.path.exists(os.path.join(w, "rows.jsonl")) else []
dev = "CPU twins (rehearsal)" if rehearse else "CUDA"
print(f"| tiny artifact | ppl CPU bf16 | ppl {dev} | Δppl % (bound) | max abs Δlogit (bound) | CPU f32 vs bf16: Δppl %, max abs Δlogit | greedy same | verdict |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["kind"] == "tiny":
        print(f"| {r['name']} | {f(r['ppl_cpu'])} | {f(r['ppl_dev'])} | {f(r['dppl_pct'], 4)} ({f(r['dppl_bound'], 3)}) | "
              f"{f(r['max_dlogit'], 5)} ({f(r['logit_bound'], 3)}) | {f(r['floor_dppl_pct'], 4)}, {f(r['floor_dlogit'], 5)} | "
              f"{r['greedy_same']}/{r['greedy_of']}" + (f" (+{r['greedy_ties']} at near-ties, margins {', '.join(f'{m:.4f}' for m in r['tie_margins'])})" if r.get('greedy_ties') else "") + " | "
              f"{'PASS' if r['pass'] else 'FAIL'} |")
print()
print(f"| synthetic model on {dev} | ppl | ppl tokens/s | prefill tokens/s | decode tokens/s | peak GPU MiB | KLD vs bf16 |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["kind"] == "big":
        print(f"| {r['name']} | {f(r['ppl'])} | {f(r['ppl_tokens_per_s'], 0)} | {f(r['prefill_tokens_per_s'], 0)} | "
              f"{f(r['decode_tokens_per_s'], 1)} | {r['peak_mib']} | {f(r.get('kld_vs_bf16'), 6)} |")
print()
steps = [l.rstrip("\n").split("\t") for l in open(os.path.join(w, "steps.tsv")) if l.strip()]
bad = [s for s in steps if s[1] != "0"]
print(f"steps: {len(steps)}, failed: {len(bad)}" + "".join(f"\n  {s[0]} (rc {s[1]})" for s in bad))
fails = [r["name"] for r in rows if not r["pass"] and not r.get("diagnostic")]
if fails:
    print("rows over their bounds: " + ", ".join(fails))
diag = [r["name"] for r in rows if not r["pass"] and r.get("diagnostic")]
if diag:
    print("diagnostic rows over their bounds (informational, not gated): " + ", ".join(diag))
PY
grep '"diagnostic": false' "$W/rows.jsonl" 2>/dev/null | grep -q '"pass": false' && FAILED=1
say "done in $(( $(date +%s) - T0 )) s"
exit $FAILED
