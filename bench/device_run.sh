#!/usr/bin/env bash
# One device call of the wave-2 benches, from the repository root on the GPU machine:
#   bash bench/device_run.sh decode throughput gpu-tests lora grammar prefix mixed profile \
#                            speculative api quant
# and on a multi-GPU kind (nvidia-h200-x4 or -x8; tensor parallelism, issue 22):
#   bash bench/device_run.sh tp-parity tp8b      then      bash bench/device_run.sh tp70b
# Each bench runs under its own time limit (a call has 600 s), its whole output in $OUT/<name>.txt
# and its last lines on stdout, so one failing bench still leaves the others' tables.
. bench/device_env.sh > "$OUT/env.txt" 2>&1
# NVLink multicast stays off for every process (the device library's KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd bench
run() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name $(date +%T)"
  timeout "$limit" python "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$? $(date +%T)"
  grep -v "it/s\]" "$OUT/$name.txt" | tail -40
}
for bench in "$@"; do
  case $bench in
    decode) run decode 240 bench_decode.py --skip-hf --batches 1,64,128 ;;
    throughput) run throughput 400 bench_throughput.py --skip hf,triton ;;
    gpu-tests) run gpu-tests 560 -m pytest -q -p no:cacheprovider -m gpu \
                 ../tests/gpu/test_gpu_parity.py ../tests/gpu/test_lora_parity.py \
                 ../tests/gpu/test_no_compile_while_serving.py \
                 ../tests/kernels/test_lora.py ;;
    lora) run lora 340 bench_lora.py ;;
    grammar) run grammar 150 bench_grammar.py --tokenizer ../.carry/demo-tokenizer ;;
    prefix) run prefix 540 bench_prefix.py ;;
    mixed) run mixed 300 bench_prefix.py --scenarios mixed --chunks 512,256,128 --eager-chunks "" ;;
    profile) run profile 170 profile_mixed_step.py ;;
    speculative) run speculative 420 bench_speculative.py --skip real ;;
    api) run api 500 bench_api.py --serve-llama3-8b ;;
    quant) run quant 560 bench_quant.py --no-tune --batches 1,8,32,64 \
             --quantize gptq,eetq,fp8,bitsandbytes-nf4 ;;
    tp-parity) run tp-parity 400 -m pytest -q -s -p no:cacheprovider \
                 ../tests/gpu/test_tensor_parallel_gpu.py ;;
    tp8b) run tp8b 560 bench_tensor_parallel.py --model 8b --shards 1,2,4 ;;
    tp70b) run tp70b 560 bench_tensor_parallel.py --model 70b --shards 4,8 ;;
    *) echo "unknown bench $bench" ;;
  esac
done
