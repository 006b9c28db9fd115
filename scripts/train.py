"""The script the deepspeed launcher runs:

    deepspeed --num_gpus N scripts/train.py --recipe recipes/tiny_cpu.yaml [--set train.steps=20 ...]
    deepspeed --hostfile hosts scripts/train.py --recipe R          # several nodes
    MOE_VERBOSE=1 deepspeed ...                                     # keep DeepSpeed's own logs on the ranks
"""

import sys

from moe_model.train.main import main

if __name__ == "__main__":
    sys.exit(main())
