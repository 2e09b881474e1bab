#!/usr/bin/env bash
# Builds minitron-verify with CUDA on a machine without a GPU or a CUDA toolkit, and the CPU
# minitron-convert beside it, both in the `dist` profile (stripped), ready to carry to a GPU host.
#
#   scripts/build-cuda.sh [OUT_DIR]        (default: target/gpu-bundle)
#
# Steps: CUDA 13.0.x wheels from pip into .cuda/venv (13.0 matches the GPU hosts' driver; a newer
# nvcc emits PTX that driver cannot load); .cuda/root with bin/include links and lib64 links to
# the versioned libraries; a link-only libcuda stub generated from the driver symbols cudarc
# references (used by the linker only: it is never copied to OUT_DIR nor put on a run-time
# library path); then cargo with CUDA_COMPUTE_CAP=90 (H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$PWD
OUT=${1:-target/gpu-bundle}
CUDA_DIR=$ROOT_DIR/.cuda
VENV=$CUDA_DIR/venv
CROOT=$CUDA_DIR/root
TARGET_DIR=$ROOT_DIR/target/cuda
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2"
CU=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CU/bin/nvcc" ] || { echo "build-cuda: nvcc not found under $CU/bin" >&2; exit 1; }

rm -rf "$CROOT"
mkdir -p "$CROOT/lib64/stubs"
ln -s "$CU/bin" "$CROOT/bin"
ln -s "$CU/include" "$CROOT/include"
for lib in cudart cublas cublasLt curand nvrtc; do
  f=$(ls "$CU/lib/lib$lib.so."* 2>/dev/null | sort | head -n 1 || true)
  [ -n "$f" ] || { echo "build-cuda: lib$lib.so.* not found in $CU/lib" >&2; exit 1; }
  ln -s "$f" "$CROOT/lib64/lib$lib.so"
done

export PATH=$CU/bin:$PATH
export CUDA_HOME=$CROOT CUDA_PATH=$CROOT CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# nvcc reads NVCC_APPEND_FLAGS itself. The strongest fatbin compression takes candle's cubins
# from 33 MB to about a third (the driver decompresses them at load), which is what keeps the
# two binaries under the GPU hosts' 64 MiB upload limit. candle-kernels' build script does not
# watch this variable, so a change of flags cleans it explicitly.
export NVCC_APPEND_FLAGS="--compress-mode=size"
stamp=$CUDA_DIR/nvcc-append-flags
if [ "$(cat "$stamp" 2>/dev/null)" != "$NVCC_APPEND_FLAGS" ]; then
  cargo clean --profile dist --target-dir "$TARGET_DIR" -p candle-kernels 2>/dev/null || true
  echo "$NVCC_APPEND_FLAGS" > "$stamp"
fi

# The stub needs the list of driver symbols cudarc uses: build the library first (nothing is
# linked yet), then read cudarc's rlib.
cargo build --locked --profile dist --features cuda --target-dir "$TARGET_DIR" --lib
rlib=$(ls -t "$TARGET_DIR"/dist/deps/libcudarc-*.rlib | head -n 1)
nm "$rlib" 2>/dev/null | awk '$1=="U"{print $2}' | grep '^cu[A-Z]' | sort -u \
  | awk '{print "int " $1 "(void){return 999;}"}' > "$CUDA_DIR/libcuda-stub.c"
[ -s "$CUDA_DIR/libcuda-stub.c" ] || { echo "build-cuda: no driver symbols found in $rlib" >&2; exit 1; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CROOT/lib64/stubs/libcuda.so" "$CUDA_DIR/libcuda-stub.c"

cargo build --locked --profile dist --features cuda --target-dir "$TARGET_DIR" --bin minitron-verify
cargo build --locked --profile dist --bin minitron-convert

mkdir -p "$OUT"
cp "$TARGET_DIR/dist/minitron-verify" "$OUT/minitron-verify"
cp target/dist/minitron-convert "$OUT/minitron-convert"

# --- Preflight, no GPU needed: every kernel name the runner can request must be declared by the
# PTX module it is looked up in, and that PTX must be the one embedded in the binary; every
# NEEDED library must resolve. A name that no module declares is the bug class that made every
# FP8 artifact fail on a GPU (candle asks for `cast_f8e4m3_*`, its PTX declares `cast_f8_e4m3_*`).
echo "preflight: kernel names"
ptx_dir=$(ls -td "$TARGET_DIR"/dist/build/candle-kernels-*/out 2>/dev/null | head -n 1)
ours=$(ls -t "$TARGET_DIR"/dist/build/minitron-*/out/minitron_kernels.ptx 2>/dev/null | head -n 1)
[ -n "$ptx_dir" ] && [ -n "$ours" ] || { echo "build-cuda: PTX not found under $TARGET_DIR" >&2; exit 1; }
entries=$CUDA_DIR/entries.txt
: > "$entries"
for f in "$ptx_dir"/*.ptx "$ours"; do
  m=$(basename "$f" .ptx); [ "$f" = "$ours" ] && m=minitron
  grep -oE '\.entry [A-Za-z0-9_]+' "$f" | awk -v m="$m" '{print m, $2}' >> "$entries"
done
embedded=$CUDA_DIR/embedded.txt
strings -n 8 "$OUT/minitron-verify" | grep -oE '\.entry [A-Za-z0-9_]+' | awk '{print $2}' | sort -u > "$embedded"
"$OUT/minitron-convert" cuda-kernels > "$CUDA_DIR/requested.txt"
bad=0; n=0
while read -r mod name; do
  n=$((n + 1))
  if ! grep -qx "$mod $name" "$entries"; then
    echo "  MISSING  $mod.$name: no .entry in the $mod PTX module" >&2; bad=1
  elif ! grep -qx "$name" "$embedded"; then
    echo "  MISSING  $mod.$name: declared in $mod.ptx but not embedded in minitron-verify" >&2; bad=1
  else
    echo "  ok  $mod.$name"
  fi
done < "$CUDA_DIR/requested.txt"
# Negative control: the name candle 0.11.1 asks for when casting FP8 on a GPU must be reported
# missing, or this check could not have caught that bug.
if grep -q " cast_f8e4m3_bf16$" "$entries"; then
  echo "  note: cast_f8e4m3_bf16 is declared now (a fixed candle-kernels?)"
else
  echo "  control: cast.cast_f8e4m3_bf16 (what candle requests for FP8) is correctly reported missing"
fi
echo "preflight: $n kernel names checked against $(wc -l < "$entries") .entry names in $(ls "$ptx_dir"/*.ptx | wc -l) candle modules and ours"
echo "preflight: NEEDED libraries of minitron-verify"
ldd_dir=$CUDA_DIR/ldd
rm -rf "$ldd_dir"; mkdir -p "$ldd_dir"
# The link-time stub stands in for the driver's libcuda.so.1, which every GPU host has.
ln -s "$CROOT/lib64/stubs/libcuda.so" "$ldd_dir/libcuda.so.1"
for lib in $(readelf -d "$OUT/minitron-verify" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); print $5}'); do
  where=$(LD_LIBRARY_PATH=$ldd_dir:$CU/lib ldd "$OUT/minitron-verify" \
    | awk -v l="$lib" '$1==l {print $3} $1 ~ "/"l"$" {print $1}')
  if [ -z "$where" ] || [ "$where" = "not" ]; then
    echo "  MISSING  $lib" >&2; bad=1
  else
    case $lib in
      libcuda.so.1) echo "  ok  $lib (the GPU driver's; stub here)";;
      *) echo "  ok  $lib -> $where";;
    esac
  fi
done
[ "$bad" = 0 ] || { echo "build-cuda: preflight failed" >&2; exit 1; }
echo "preflight: passed"
end=$(date +%s)
echo "built in $((end - start)) s:"
for b in "$OUT/minitron-verify" "$OUT/minitron-convert"; do
  printf '  %s  %s bytes (%s MiB)\n' "$b" "$(stat -c %s "$b")" "$(( $(stat -c %s "$b") / 1048576 ))"
done
total=$(( $(stat -c %s "$OUT/minitron-verify") + $(stat -c %s "$OUT/minitron-convert") ))
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "  together $((total / 1048576)) MiB; with the working tree ($((tree / 1048576)) MiB) $(( (total + tree) / 1048576 )) MiB (limit for the GPU host: 60 MiB)"
if [ $((total + tree)) -ge $((60 * 1048576)) ]; then
  echo "build-cuda: bundle and working tree exceed 60 MiB and cannot be carried to a GPU host" >&2
  exit 1
fi
