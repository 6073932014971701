#!/usr/bin/env bash
# The several-GPU runs (README "Multi-GPU", benchmarks/RESULTS.md), on one machine with N >= 2 CUDA GPUs:
#   bash benchmarks/multi_gpu.sh checks  [OUT]   # gpu-marked tests (DDP/NCCL, FSDP, evaluate 1 vs N) and FVD 1 vs N
#   bash benchmarks/multi_gpu.sh scaling [OUT]   # XL training step: 1 GPU, N GPUs DDP, N GPUs FSDP
#   bash benchmarks/multi_gpu.sh ddp-compile [OUT] # compiled DDP: dynamo's graph split at buckets or not, bucket sizes
#   bash benchmarks/multi_gpu.sh comm    [OUT]   # NCCL transport and all-reduce bandwidth; DDP with bf16 gradients;
#                                                # eager FSDP against eager DDP
#   bash benchmarks/multi_gpu.sh fit     [OUT]   # MovingDigits base: walt fit on 1 GPU and on N GPUs (DDP) at the
#                                                # same global batch; loss curves, weights across ranks
# Results (JSON, logs) go to OUT (default multi_gpu_out/). NCCL's NVLink multicast stays off.
set -uo pipefail
stage=${1:?checks or scaling}
out=${2:-multi_gpu_out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $n"
nvidia-smi topo -m > "$out/topology.txt" 2>&1

if [ "$stage" = checks ]; then
  python3 -m pytest -m gpu tests/test_distributed.py -v 2>&1 | tee "$out/tests.log"
  # FVD under the standard protocol (2048 real MovingDigits test clips vs 2048 training clips), 1 process vs N.
  for split in test train; do
    seed=$([ $split = test ] && echo 0 || echo 1)
    printf 'dataset:\n  class_path: walt.data.MovingDigits\n  init_args: {split: %s, num_samples: 2048, num_frames: 16, seed: %s}\n' \
      $split $seed > "$out/md_$split.yaml"
  done
  args=(evaluate fvd2048_16f --real "$out/md_test.yaml" --fake "$out/md_train.yaml" --no-cache --no-progress)
  s=$(date +%s); python3 -m walt "${args[@]}" --output "$out/fvd_1proc.json" > /dev/null; e1=$(( $(date +%s) - s ))
  s=$(date +%s); python3 -m torch.distributed.run --nproc_per_node "$n" -m walt "${args[@]}" --output "$out/fvd_${n}gpu.json" > /dev/null
  eN=$(( $(date +%s) - s ))
  python3 - "$out" "$n" "$e1" "$eN" <<'PY'
import json, sys
from pathlib import Path
out, n, e1, eN = sys.argv[1:]
a, b = (json.load(open(f"{out}/{name}.json")) for name in ("fvd_1proc", f"fvd_{n}gpu"))
print(f"FVD 1 process: {a['value']!r} ({e1} s); {n} GPUs: {b['value']!r} ({eN} s); bit-identical: {a['value'] == b['value']}")
PY
fi

if [ "$stage" = scaling ]; then
  run() { python3 benchmarks/training.py --cases xl --compile "$@" 2>&1 | tail -n 40; }
  run --devices 1 --out "$out/xl_1gpu.json"
  run --devices "$n" --strategy ddp --out "$out/xl_ddp.json"
  run --devices "$n" --strategy fsdp --out "$out/xl_fsdp.json" || true
  python3 - "$out" <<'PY'
import json, sys, pathlib
rows = [json.load(open(p))[0] for p in sorted(pathlib.Path(sys.argv[1]).glob("xl_*.json"))]
one = next((r for r in rows if r["devices"] == 1), None)
for r in rows:
    eff = f"{100 * one['ms_per_step'] / r['ms_per_step']:.1f} %" if one and r["ms_per_step"] else "-"
    print(f"{r['strategy']:>14} x{r['devices']}: {r['ms_per_step']} ms/step, {r['peak_gib']} GiB/GPU, scaling {eff}")
PY
fi

if [ "$stage" = ddp-compile ]; then
  # Why compiled DDP scales worse than eager DDP (74 % against 98 % on 2 GPUs): each variant in one run.
  run() { python3 benchmarks/training.py --cases xl --compile --devices "$n" --strategy ddp "$@" 2>&1 | grep '^{'; }
  python3 benchmarks/training.py --cases xl --compile --devices 1 --out "$out/xlc_1gpu.json" 2>&1 | grep '^{'
  run --out "$out/xlc_ddp_default.json"
  run --optimize-ddp no_optimization --out "$out/xlc_ddp_nosplit.json"
  run --bucket-cap-mb 100 --out "$out/xlc_ddp_bucket100.json"
  run --optimize-ddp no_optimization --bucket-cap-mb 100 --out "$out/xlc_ddp_nosplit_bucket100.json"
fi

if [ "$stage" = comm ]; then
  NCCL_DEBUG=INFO python3 -m torch.distributed.run --nproc_per_node "$n" benchmarks/allreduce.py > "$out/allreduce.log" 2>&1
  grep -E "via|Channel 00|peer_to_peer" "$out/allreduce.log" | head -n 12
  run() { python3 benchmarks/training.py --cases xl "$@" 2>&1 | grep '^{'; }
  run --compile --devices "$n" --strategy ddp --ddp-comm-hook bf16 --out "$out/xl_ddp_bf16grads.json"
  run --devices 1 --out "$out/xl_1gpu_eager.json"
  run --devices "$n" --strategy ddp --out "$out/xl_ddp_eager.json"
  run --devices "$n" --strategy fsdp --out "$out/xl_fsdp_eager.json"
fi

if [ "$stage" = fit ]; then
  w=${WORK:-/tmp/md_multi_gpu}
  python3 tools/moving_digits.py tokenizer --out "$w" --workers 12 --tokenizer-seconds "${TOKENIZER_SECONDS:-45}" 2>&1 | tail -n 3
  python3 -m walt encode --config "$w/configs/tokenizer.yaml" --data "$w/configs/latents.yaml" \
    --checkpoint "$w/tokenizer_export/vae.safetensors" --output "$w/latents" --stats-samples 0 \
    --batch-size 128 --num-workers 12 --dtype float16 2>&1 | tail -n 1
  steps=${STEPS:-800}
  fit() {  # $1: run name, then extra arguments
    name=$1; shift
    PYTHONPATH=$PWD/tests:${PYTHONPATH:-} python3 -m walt fit --config "$w/configs/base.yaml" \
      --trainer.max_steps "$steps" --trainer.max_time null --trainer.val_check_interval "$steps" \
      --trainer.log_every_n_steps 25 --trainer.enable_progress_bar false --trainer.default_root_dir "$w/$name" \
      --trainer.callbacks+=_rank_state.SaveRankState --trainer.callbacks.folder "$w/$name/ranks" "$@" 2>&1 | tail -n 2
  }
  s=$(date +%s); fit base_1gpu; t1=$(( $(date +%s) - s ))
  s=$(date +%s); fit base_ddp --config configs/distributed/ddp.yaml --trainer.devices "$n" \
    --data.init_args.batch_size $(( 128 / n )); tN=$(( $(date +%s) - s ))
  python3 - "$w" "$out" "$n" "$t1" "$tN" <<'PY'
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, "tools")
from moving_digits import scalars
w, out, n, t1, tN = sys.argv[1:]
curves = {name: scalars(Path(f"{w}/{name}")) for name in ("base_1gpu", "base_ddp")}
ranks = [torch.load(f"{w}/base_ddp/ranks/rank{r}.pt", map_location="cpu") for r in range(int(n))]
same = all(torch.equal(ranks[0][p][k], other[p][k]) for other in ranks[1:] for p in ("backbone", "ema") for k in ranks[0][p])
result = {"seconds": {"1gpu": int(t1), f"{n}gpu_ddp": int(tN)}, "weights_identical_across_ranks": same, "curves": curves}
json.dump(result, open(f"{out}/fit_curves.json", "w"), indent=1)
loss = {k: [v for v in c.get("train/loss", [])] for k, c in curves.items()}
print(json.dumps({"seconds": result["seconds"], "weights_identical_across_ranks": same}))
for k, v in loss.items():
    print(k, [(s, round(x, 4)) for s, x in v[:: max(1, len(v) // 8)]])
PY
fi
