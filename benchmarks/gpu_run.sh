#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on a machine with CuPy and an NVIDIA GPU:
#   bash benchmarks/gpu_run.sh OUTDIR [part ...]      parts: info tests bench torch train suite (default: all)
#   graphs: only the new GPU code's checks, short (the CUDA-graph step's, the fused batch-norm
#   kernels' and the one-kernel im2col/col2im's tests; WRN-28-4 full at batch 32 and 128 with and
#   without --cuda-graphs, with the batch-norm fusion off, and with cuda_conv_kernels off and on,
#   beside PyTorch when it is installed): for a short device lease
# "torch" needs PyTorch with CUDA beside CuPy (pip install -e '.[bench]').
# From a checkout, no install needed (PYTHONPATH); logs go to OUTDIR, one file per part.
# "tests" and "graphs" leave out the kernels' CPU runs (-k "not c-on-cpu": C++ compiles, no GPU
# needed, run by CI); "suite" runs everything.
set -u
OUT=${1:?usage: gpu_run.sh OUTDIR [info|tests|bench|torch|train|suite|graphs ...]}; shift
PARTS=${*:-info tests bench torch train suite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
for part in $PARTS; do
  case $part in
    info)   { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
              $PY -c "import sys, numpy, cupy; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())"
              nproc; } 2>&1 | tee "$OUT/info.txt" ;;
    tests)  rm -f "$OUT/graph_step.txt"             # the graph step's tests report into it
            NPMASK_GPU_REPORT="$OUT/graph_step.txt" \
            $PY -m pytest -q -n 8 -p no:cacheprovider -k "not c-on-cpu" tests/test_gpu.py tests/test_cuda_kernels.py \
              tests/test_backend.py tests/test_data_loader.py tests/test_cupy_api.py \
              tests/test_gpu_graph_step.py tests/test_graph_step.py tests/test_batchnorm_cuda.py \
              tests/test_conv_cuda.py \
              "tests/test_train.py::test_cupy_training_is_reproducible_and_agrees_with_numpy" \
              "tests/test_train.py::test_cupy_training_with_cuda_graphs_repeats_itself_and_agrees_without" \
              2>&1 | tee "$OUT/tests_gpu.txt" ;;
    bench)  { $PY benchmarks/train_step.py --backend cupy --repeats 20 --cuda-graphs --unfused
              $PY benchmarks/train_step.py --backend cupy --repeats 20 --batch 128 --variants full,piggyback,simple --cuda-graphs
              $PY benchmarks/train_step.py --backend cupy --repeats 20 --variants full,piggyback --cuda-graphs \
                --setting cuda_conv_kernels=False,True
              $PY benchmarks/conv.py --backend cupy --repeats 20; } 2>&1 | tee "$OUT/bench_cupy.txt" ;;
    torch)  { $PY benchmarks/vs_torch.py --device cuda --rounds 20 --variants full,piggyback,finetune \
                --nets wrn28_4:64:32,wrn28_4:64:128,wrn16_1:32:32 --cuda-graphs; } 2>&1 | tee "$OUT/vs_torch_cuda.txt" ;;
    train)  { start=$(date +%s)
              run=$(mktemp -d)/run                   # a fresh run folder every time
              $PY -m npmask.train --backend cupy --out "$run" --quiet
              echo "main job on cupy: $(( $(date +%s) - start )) s wall (synthetic data generation included)"
              cat "$run/results.md"
              start=$(date +%s); run=$(mktemp -d)/run
              $PY -m npmask.train --backend cupy --cuda-graphs --out "$run" --quiet
              echo "main job on cupy with --cuda-graphs: $(( $(date +%s) - start )) s wall"
              cat "$run/results.md"; } 2>&1 | tee "$OUT/train_cupy.txt" ;;
    suite)  $PY -m pytest -q -n 16 -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/suite.txt" ;;
    graphs) { rm -f "$OUT/graph_step.txt"
              NPMASK_GPU_REPORT="$OUT/graph_step.txt" $PY -m pytest -q -n 4 -p no:cacheprovider -rfE -k "not c-on-cpu" \
                tests/test_gpu_graph_step.py tests/test_graph_step.py tests/test_batchnorm_cuda.py \
                tests/test_conv_cuda.py \
                "tests/test_train.py::test_cupy_training_with_cuda_graphs_repeats_itself_and_agrees_without"
              cat "$OUT/graph_step.txt"
              for b in 32 128; do
                $PY benchmarks/train_step.py --backend cupy --repeats 10 --batch $b --variants full --cuda-graphs --unfused
                $PY benchmarks/train_step.py --backend cupy --repeats 10 --batch $b --variants full --cuda-graphs \
                  --setting cuda_conv_kernels=False,True
              done
              if $PY -c "import torch" 2>/dev/null; then
                $PY benchmarks/vs_torch.py --device cuda --rounds 10 --variants full --no-inference \
                  --nets wrn28_4:64:32,wrn28_4:64:128 --cuda-graphs
              fi; } 2>&1 | tee "$OUT/graphs.txt" ;;
    *)      echo "unknown part $part"; exit 2 ;;
  esac
done
