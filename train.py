"""Train a torchvision backbone on CIFAR-10 (or your images): the same script under every launcher.

One process (CPU or one GPU), pdb-friendly:
    python train.py --debug
    python train.py --mode transfer --epochs 3
One node, 4 GPUs:
    torchrun --standalone --nproc_per_node=4 train.py --mode finetune
    accelerate launch --config_file launch/accelerate_1node_4gpu.yaml train.py --mode finetune
Two nodes (run on each, NODE_RANK=0 on the first):
    NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 bash launch/torchrun.sh --mode scratch
SLURM:
    sbatch slurm/one_node.sbatch --mode finetune --epochs 10
Every flag: python train.py --help. Exit codes: 0 done, 2 bad input, 75 stopped by a signal (resumable).
"""

import sys

from dtl.cli import entry

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
