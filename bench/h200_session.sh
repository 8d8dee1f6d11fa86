#!/usr/bin/env bash
# One device call on the lent H200: install the carried wheels, then run the stages
# named in $STAGES (default: all), each with a wall-clock cap, writing JSON under $OUT.
#
#   STAGES="fabric_tests fabric_micro disagg" bash bench/h200_session.sh
#
# Carry [".whl", ".carry"]: .whl from ../shared/tools/gpu-wheels --with-nixl (or WHL=.whl_small,
# the same wheels without nixl, for stages that do not need it), .carry/tok.txz
# (the SmolLM2 tokenizer for prompts), .carry/revert.patch (`git diff HEAD -R`: the device
# copy gets uncommitted edits of the working tree; the patch takes them back out).
set -u
STAGES=${STAGES:-"fabric_tests fabric_micro disagg kernels"}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install --no-index --no-deps -q ${WHL:-.whl}/*.whl 2>&1 | tail -2
if [ -s .carry/revert.patch ]; then patch -p1 -s < .carry/revert.patch && echo "reverted uncommitted edits"; fi
mkdir -p /tmp/pp build && ln -sfn "$PWD" /tmp/pp/pdserve
export PYTHONPATH=/tmp/pp PDSERVE_REV=${PDSERVE_REV:-unknown}
[ -f .carry/tok.txz ] && tar xJf .carry/tok.txz  # -> build/pdtok
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

stage() { echo "=== $1 ($(date +%T))"; }
for s in $STAGES; do
  case $s in
    fabric_tests)
      stage "$s"
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kvfabric 2>&1 | tail -25
      timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_triton_kv_copy.py 2>&1 | tail -5 ;;
    fabric_micro)
      stage "$s"
      timeout 120 python3 -m pdserve.bench.fabric_micro 2>&1 | tail -20 ;;
    disagg)
      stage "$s"
      timeout 420 python3 bench/disagg_h200.py --transports ${TRANSPORTS:-cuda_ipc,nixl,tcp} \
        --reps ${REPS:-6} ${DISAGG_ARGS:-} 2>&1 | tail -40 ;;
    gpu_tests)
      stage "$s"
      # (tests/router and tests/e2e need openai and schemathesis, not carried)
      timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine tests/prefill \
        2>&1 | tail -25
      timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 | tail -8 ;;
    kernels)
      stage "$s"
      timeout ${KERNELS_TIMEOUT:-300} python3 bench/kernels_h200.py ${KERNELS_ARGS:---b1-sweep} \
        --rev "$PDSERVE_REV" 2>&1 | tail -${KERNELS_TAIL:-40} ;;
    gemv)
      stage "$s"
      timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_triton_gemv.py \
        2>&1 | tail -5
      timeout 400 python3 bench/gemv_h200.py 2>&1 | grep -v "^\.\.\. " | tail -30 ;;
    decode_chain)
      stage "$s"
      timeout ${CHAIN_TIMEOUT:-150} python3 bench/decode_chain_h200.py --rev "$PDSERVE_REV" \
        2>&1 | tail -8 ;;
    step_profile)
      stage "$s"
      timeout 400 python3 bench/step_profile_h200.py 2>&1 | tail -${PROFILE_TAIL:-40} ;;
    engine)
      stage "$s"
      timeout 420 python3 bench/engine_h200.py --trace .carry/trace.csv 2>&1 | tail -30 ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "=== done ($(date +%T))"
