"""`torchrun -m csmf.torchrun_entry ARGS`: one training process of a multi-process run (csmf.distributed); ARGS are
`csmf train`'s. `csmf train --nproc N` launches N of these on one machine; several machines run torchrun
with their own --nnodes / --node-rank / --rdzv-endpoint (README, multi-process training)."""

from __future__ import annotations

import sys

from csmf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
