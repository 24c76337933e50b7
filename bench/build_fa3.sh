#!/usr/bin/env bash
# Builds FlashAttention-3 (flash-attention's hopper/ folder) with paged KV, forward only, head dim 128,
# bf16, sm90: the kernel block-sparse attention uses on Hopper (mindiesd_compile/sparse/kernels.py).
# The fa3-fwd wheel leaves paged KV out. ~2 minutes on 16 cores with CUDA 13.
#   bench/build_fa3.sh FLASH_ATTENTION_CHECKOUT   (a clone of Dao-AILab/flash-attention with csrc/cutlass)
#   export PYTHONPATH=FLASH_ATTENTION_CHECKOUT/hopper:$PYTHONPATH   # then `import flash_attn_interface` works
set -euo pipefail
cd "$1/hopper"
for f in BACKWARD SPLIT FP16 FP8 HDIM64 HDIM96 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 SOFTCAP PACKGQA SM80 \
         LOCAL APPENDKV CLUSTER; do
  export "FLASH_ATTENTION_DISABLE_$f=TRUE"
done
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 setup.py build_ext --inplace
python3 -c "import flash_attn_interface as f; print('built', f.__file__)"
