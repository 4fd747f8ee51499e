#!/usr/bin/env bash
# One device run for a lent H100/H200 (no network there): install offline, run the GPU tests, the kernel
# microbenchmarks and the end-to-end memory/time table, write everything under $OUT, print a short table.
# Budget: each step has its own timeout (170 + 2x45 + 110 + 2x40 + 110 s = 560 s, plus the install): under 10
# minutes, so it fits one device call.
#   run: bash benchmarks/gpu_check.sh        (OUT defaults to ./gpu_results)
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# 1. GPU tests: kernels (fp32/fp16/bf16), the interpreter's Triton cases compiled on CUDA tensors, every
#    shipped attention tile config, opcheck of the Triton ops, the cifar10 U-Net's fused gradients.
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/kernels tests/ops tests/test_fused.py tests/test_dualize.py \
  -k "gpu or cuda or cifar10 or triton" \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25

# 2. Kernel microbenchmarks (do_bench medians, achieved bandwidth vs measured copy bandwidth).
timeout 45 python3 benchmarks/bench_groupnorm_silu.py --stage --out "$OUT/bench_groupnorm_silu.json" 2>&1 | tail -n 20
timeout 45 python3 benchmarks/bench_attention.py --quick --out "$OUT/bench_attention" 2>&1 | tail -n 20

# 3. The paper's memory table on the cifar10 U-Net at batch 128 (triton backend): every method, the fused
#    path being the network's one forward dualized (sgflow.dualize, blocks chosen by measurement).
timeout 110 python3 benchmarks/memory.py --device cuda --config cifar10 --batch 128 --steps 5 --warmup 2 \
  --backend triton --track-peak --methods flow_matching,meanflow,sgflow_reference,sgflow_fused \
  --out "$OUT/memory_triton" 2>"$OUT/memory_triton.err" | tee "$OUT/memory_triton.txt"
# 4. Users' networks (testnets.py at the repository root, third-party style) on the dualized fused path vs flow matching, fp32.
for spec in 'adm|3,32,32|{"channel_mult": [1,2,2], "num_res_blocks": 2, "model_channels": 128}' \
            'dit|3,32,32|{"depth": 12, "hidden_size": 384, "num_heads": 6}'; do
  IFS='|' read -r net shape kw <<< "$spec"
  timeout 40 python3 benchmarks/memory.py --device cuda --network "$net" --shape "$shape" --net-kw "$kw" --batch 64 \
    --steps 5 --warmup 2 --methods flow_matching,sgflow_fused --out "$OUT/memory_$net" 2>"$OUT/memory_$net.err" \
    | tee "$OUT/memory_$net.txt"
done
# 5. torch.compile on and off (inductor): the fused step's dual forward traced into the graph (sgflow.autodual.traced)
#    against compiled flow matching, graph breaks, compile time, compiled = eager check (grad err column).
timeout 110 python3 benchmarks/compile_step.py --device cuda --network dit --shape 3,32,32 \
  --net-kw '{"depth": 6, "hidden_size": 384, "num_heads": 6}' --batch 64 --out "$OUT/compile_step_dit.json" \
  2>"$OUT/compile_step_dit.err" | tee "$OUT/compile_step_dit.txt"
