#!/usr/bin/env bash
# GPU runbook for issue 5: TensorRT native / TensorRT EP / CUDA EP / CPU on the device machine, in one session.
#
# The device machine (H100/H200) reaches no package index and takes at most 64 MiB of working tree per
# call, so the wheels it lacks travel in parts; it keeps /tmp between calls only while it stays warm
# (30 s after a call), so send the parts back to back. What it has (KINDS.md): python3 3.12 with torch
# (cu130), cuda-bindings, onnx, onnxruntime (CPU), numpy, opencv, pytest, psutil, pyyaml, typer, rich,
# prometheus-client; the CUDA 13 / cuDNN 9 libraries as nvidia-* wheels. What it lacks and we send:
# onnxruntime-gpu (CUDA 13 build, 256 MB), pydantic(+core), pyzmq, protobuf (our pins), the video, and
# the generated appliance/v1 stubs (git-ignored).
#
# TensorRT itself is NOT obtainable here: `tensorrt-cu13-libs` on the index is a stub sdist that downloads
# from NVIDIA's own index at install time (unreachable from these machines and from the device), and the
# device image ships no TensorRT. The `device` step probes for it anyway; without it the TensorRT rows
# (native and EP) are recorded as skipped with the reason, and the parity tests skip cleanly.
#
# Steps (here = the CPU dev machine, device = the `run` tool):
#   here:   bash bench/gpu_session.sh prepare            # downloads, splits into .gpu/parts/, prints N
#   for k in 1..N-1:
#     here:   bash bench/gpu_session.sh stage k
#     device: run(command="bash bench/gpu_session.sh receive", carry=[".gpu/send"], timeout_s=300)
#   here:   bash bench/gpu_session.sh stage N
#   device: run(command="bash bench/gpu_session.sh device", carry=[".gpu/send"], timeout_s=600)
#   here:   bash bench/gpu_session.sh collect FILES_AT     # copies the results into bench/results/
# `device` checks the assembled bundle's sha256 first and names missing parts (machine went cold: start
# over from part 1). Its phases fit in ~5 min on an H100; GPU_ONLY="CUDA,CPU" limits the matrix rows.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ORT_GPU=onnxruntime-gpu==1.31.1        # CUDA 13 build: matches the device's torch cu130 / nvidia-* cu13 libs
SMALL_WHEELS=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
              pyzmq==27.3.0 protobuf==6.33.6)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
VIDEO=${VIDEO:-../shared/media/woman2.mp4}
STAGE=${GPU_STAGE:-/tmp/gpu-stage}

here_python() { if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi; }

prepare() {
  local exclude; exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
  rm -rf .gpu && mkdir -p .gpu/bundle/whl .gpu/bundle/media .gpu/bundle/v1 .gpu/parts
  local py; py=$(here_python)
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
      -d .gpu/bundle/whl "$ORT_GPU" "${SMALL_WHEELS[@]}"
  cp "$VIDEO" .gpu/bundle/media/
  cp appliance/v1/*_pb2*.py .gpu/bundle/v1/
  tar -C .gpu -cf .gpu/bundle.tar bundle
  # each call carries the repo too: keep repo + one part under the 64 MiB limit
  local repo_kb part_mb
  repo_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- | tail -1 | cut -f1)
  part_mb=$(( ${CARRY_MIB:-62} - repo_kb / 1024 - 1 ))
  [ "$part_mb" -ge 8 ] || { echo "repo too large to carry parts ($repo_kb KiB)"; exit 1; }
  split -b "${part_mb}m" -d -a 2 .gpu/bundle.tar .gpu/parts/part-
  (cd .gpu && sha256sum bundle.tar | cut -d' ' -f1 > parts/SHA256 && ls parts | grep -c '^part-' > parts/COUNT)
  rm -f .gpu/bundle.tar
  echo "prepared $(cat .gpu/parts/COUNT) parts of ${part_mb} MiB in .gpu/parts (repo ${repo_kb} KiB)"
  ls -la .gpu/parts
}

stage() {  # stage K (1-based): put part K (and the checksum) alone into .gpu/send
  local k=$1 name
  name=$(printf 'part-%02d' $((k - 1)))
  [ -f ".gpu/parts/$name" ] || { echo "no $name; run prepare first"; exit 1; }
  rm -rf .gpu/send && mkdir -p .gpu/send
  cp ".gpu/parts/$name" .gpu/parts/SHA256 .gpu/parts/COUNT .gpu/send/
  echo "staged $name of $(cat .gpu/parts/COUNT)"
}

receive() {  # device: keep the carried part in /tmp (kept while the machine stays warm)
  mkdir -p "$STAGE"
  cp .gpu/send/part-* .gpu/send/SHA256 .gpu/send/COUNT "$STAGE"/
  echo "device has $(ls "$STAGE" | grep -c '^part-') of $(cat "$STAGE/COUNT") parts: $(ls "$STAGE" | grep '^part-' | tr '\n' ' ')"
}

setup_device() {
  receive
  local have want
  have=$(ls "$STAGE" | grep -c '^part-'); want=$(cat "$STAGE/COUNT")
  if [ ! -d /tmp/gpu/site ]; then
    [ "$have" = "$want" ] || { echo "MISSING PARTS: $have of $want on the device (it went cold?); restage from part 1"; exit 3; }
    cat "$STAGE"/part-* > /tmp/bundle.tar
    [ "$(sha256sum /tmp/bundle.tar | cut -d' ' -f1)" = "$(cat "$STAGE/SHA256")" ] || { echo "bundle sha256 mismatch"; exit 3; }
    mkdir -p /tmp/gpu && tar -C /tmp/gpu -xf /tmp/bundle.tar && rm /tmp/bundle.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu/site \
        /tmp/gpu/bundle/whl/*.whl
  fi
  cp /tmp/gpu/bundle/v1/*_pb2*.py appliance/v1/
  export PYTHONPATH=/tmp/gpu/site:$ROOT
  # ONNX Runtime's CUDA EP dlopens CUDA 13 / cuDNN 9: take them from the nvidia-* wheels beside torch
  local nv
  nv=$(python3 - <<'EOF'
import glob, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(sp + "/nvidia/*/lib")) + sorted(glob.glob(sp + "/tensorrt_libs"))
print(":".join(dirs))
EOF
)
  export LD_LIBRARY_PATH=${nv}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PYTHONUNBUFFERED=1
}

probe() {
  echo "== $(date -u +%FT%TZ) probe"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
  python3 - <<'EOF' || true
import importlib, sys
print("python", sys.version.split()[0])
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.__file__)
print("available providers", ort.get_available_providers())
for mod in ("tensorrt", "cuda.bindings", "torch"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "ABSENT:", exc)
try:
    from appliance.vision.trt_engine import gpu_name
    print("gpu_name", gpu_name())
except Exception as exc:
    print("gpu_name failed:", exc)
EOF
  echo "libnvinfer on the system:"; (ldconfig -p | grep -i nvinfer) || echo "  none in ldconfig"
  find / -xdev \( -name 'libnvinfer.so*' -o -name 'trtexec' \) 2>/dev/null | head -5 || true
}

device() {
  : "${OUT:?run this on the device machine (OUT is set there)}"
  setup_device
  probe 2>&1 | tee "$OUT/gpu-probe.txt"
  echo "== $(date -u +%FT%TZ) tests"
  set +e
  timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/vision/test_trt_engine.py tests/vision/test_runtime.py \
      tests/vision/test_detector.py tests/vision/test_emotion.py 2>&1 | tee "$OUT/gpu-pytest.log"
  echo "== $(date -u +%FT%TZ) bench"
  local only=()
  [ -n "${GPU_ONLY:-}" ] && only=(--only "$GPU_ONLY")
  timeout 300 python3 -m bench vision --video /tmp/gpu/bundle/media/woman2.mp4 --gpu-matrix --no-peer \
      --sweep-repeats 100 --json "$OUT/vision-woman2-gpu.json" "${only[@]}" 2>&1 | tee "$OUT/gpu-bench.log"
  set -e
  ls -la "$OUT"
}

collect() {  # here: copy what the device call brought back into bench/results/
  local from=${1:?usage: collect FILES_AT}
  for f in vision-woman2-gpu.json vision-woman2-gpu.md vision-woman2-gpu.png gpu-probe.txt gpu-pytest.log; do
    [ -f "$from/$f" ] && cp "$from/$f" bench/results/ && echo "bench/results/$f"
  done
}

case "${1:-}" in
  prepare) prepare ;;
  stage) stage "${2:?part number}" ;;
  receive) receive ;;
  device) device ;;
  collect) collect "${2:-}" ;;
  *) sed -n 2,27p "$0"; exit 2 ;;
esac
