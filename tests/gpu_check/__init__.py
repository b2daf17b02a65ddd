"""GPU acceptance check: `make gpu-check` (= ``PYTHONPATH=. python3 -m tests.gpu_check`` from the repository root).

For any machine with one NVIDIA GPU, offline and without a venv: it runs the repository through PYTHONPATH
with the Python that runs it (`PYTHON`, default python3, which needs torch, torchvision, accelerate,
safetensors, tqdm, matplotlib and pytest). About 7 minutes on one H200 (an estimate). Every step has its own
timeout and all steps share a time budget (GPU_CHECK_BUDGET_S, default 450 s), so a hanging step cannot
stretch the check past 8 minutes.

It writes its own inputs (random torchvision weights, a synthetic CIFAR-10-format data set of CIFAR-10's size)
into a scratch folder and then runs these steps (`tests.gpu_check.steps`), one row each in the table printed at
the end; each judges what dtl wrote to its run folders (config.json, status.json, metrics.jsonl, the weights):

  inputs              weight files (torch.manual_seed(0), random init) + `dtl data synth` 50000/10000 images
  bf16_nccl_transfer  VGG16 transfer in bf16 under torchrun at world size 1 with DTL_FORCE_DISTRIBUTED=1
                      (process group + DDP on NCCL): config.json says nccl and bf16, metrics.jsonl has the epoch
  fp16_overflow       VGG16 finetune in fp16 with --fp16-init-scale 1e30: the first steps overflow; they must be
                      skipped (metrics key `overflow_skips`), not end the run as a non-finite loss
  preempt_resume      ResNet-18 --deterministic finetune, twice under torchrun + NCCL: SIGUSR1 to the second
                      run's worker mid-epoch -> exit 75, status "preempted" -> `--resume auto` (config.json
                      resumed_from); its final model.safetensors must equal the uninterrupted run's tensor by
                      tensor (torch.equal)
  compile_recompiles  ResNet-18 --compile finetune, 2 epochs, TORCH_LOGS=recompiles: at most 2 recompiles
  cache_features      VGG16 --cache-features: computed by a first run, reused by a `--resume auto` second one
                      (config.json cached_features)
  fsdp_resume         ResNet-18 --strategy fsdp (FSDP2, bf16 MixedPrecisionPolicy) --deterministic under torchrun
                      at world size 1 with DTL_FORCE_DISTRIBUTED=1 (NCCL): A trains 2 epochs; B trains 1, writing
                      a sharded checkpoint (DCP safetensors shards), then `--resume auto --epochs 2`; B's final
                      model.safetensors must equal A's tensor by tensor
  speed               the speed table: dtl's `train.py` epoch rate (metrics.jsonl images_per_sec of
                      the 2nd epoch; VGG16 transfer 32 px b256, transfer 224 px b256, finetune 224 px b64 and b256,
                      --cache-features) beside the strong hand-written loop's train-step rate
                      (`python -m dtl.tools.bench.strong_rate`, one process for all cases), as ratios, with dtl's
                      TFLOP/s against the measured bf16 matmul rate; FAIL when a speed goal is missed
                      (`tests.gpu_check.profiles.SPEED_GOALS`)
  bench               `dtl bench` VGG16 transfer at 32 px and finetune at 224 px: images/s of dtl, of the
                      reference loop and of the strong loop, both ratios, TFLOP/s
  pytest_cuda         the suite's CUDA-only tests: pytest -m cuda (none collected -> SKIP)

Exit code: 0 when no step FAILed, 1 when one did, 2 when no CUDA device is visible or GPU_CHECK_STEPS names an
unknown step (one line, nothing run). Runs and logs stay in the scratch folder; a failed step prints the last
lines of its log. The JSON report (every figure, the GPU, the torch/CUDA/cuDNN/NCCL versions) goes to
GPU_CHECK_JSON, and to $OUT/gpu_check.json too when OUT is set.

Environment:
  PYTHON                 the interpreter (read by `make gpu-check`; default python3)
  GPU_CHECK_DIR          scratch folder (default: a new temporary folder)
  GPU_CHECK_JSON         the JSON report (default: GPU_CHECK_DIR/gpu_check.json)
  GPU_CHECK_BUDGET_S     seconds all steps may take together (default 450; 480 for the CPU smoke run)
  GPU_CHECK_STEPS        comma-separated step names to run (default: all; the others show SKIP)
  GPU_CHECK_CPU_SMOKE=1  the same flow on the CPU with tiny settings (gloo instead of NCCL, SqueezeNet and
                         ResNet-18, a few hundred images), to test the check itself on a machine without a GPU

The package: `profiles` (the two flavours and the speed goals), `processes` (starting and stopping process
trees), `runfiles` (reading a run folder), `steps` (the ten steps), `report` (the table and the JSON) and
`run` (the driver and its budget).
"""
