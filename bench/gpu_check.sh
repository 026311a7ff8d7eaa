#!/usr/bin/env bash
# The GPU checks of issue 14 in one command, on a CUDA machine with bittune importable:
#   1. why LoRA trained slower than full fine-tuning, and the fused LoRA linears (bench/gpu_lora_step.py);
#   2. bittune vs TRL + PEFT on a random-initialised 1.1B Llama, bf16 (bench/vs_trl.py --device cuda);
#   3. the GPU test tier (tests/test_gpu.py);
#   4. full vs LoRA through `bittune train` (bench/gpu_qlora.py --only full LoRA);
#   5. the step benchmark with LoRA dropout 0.05 (PEFT vs fused).
# Each step has its own time limit, so one that hangs cannot take the others' time.
#   usage: bench/gpu_check.sh TOKENIZER_DIR RESULTS_DIR [WORK_DIR]
set -u
tok=$1
res=$2
work=${3:-/tmp/bittune-gpu-bench}
py=${PYTHON:-python3}
mkdir -p "$res"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "== $(date +%T) $*"; }
log "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
$py -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
$py -c "import trl, datasets, pyarrow; print('trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
$py -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
log "0. a random 1.1B Llama with the tokenizer's vocabulary"
$py bench/gpu_qlora.py --tokenizer "$tok" --work "$work" --make-model
log "1. step variants"
timeout 150 $py bench/gpu_lora_step.py --out "$res"
log "2. vs TRL"
timeout 220 $py bench/vs_trl.py --device cuda --model "$work/llama-1.1b-random" --datasets pydoc --dtypes bf16 auto \
    --rows 240 --max-length 1024 --batch 8 --accum 1 --reps 2 --out "$res/vs_trl_gpu" 2>&1 | tail -n 25
log "3. tests/test_gpu.py"
timeout 120 $py -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -n 15
log "4. full vs LoRA through bittune train"
timeout 120 $py bench/gpu_qlora.py --tokenizer "$tok" --steps 15 --only full LoRA --work "$work" --out "$res" 2>&1 | tail -n 8
log "5. step with dropout 0.05"
timeout 60 $py bench/gpu_lora_step.py --dropout 0.05 --variants lora_peft lora_fused --out "$res" | tail -n 8
log "done"
