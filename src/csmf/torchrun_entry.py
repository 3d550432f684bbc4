"""`torchrun -m csmf.torchrun_entry ARGS`: one training process of a multi-process run (csmf.distributed); ARGS are
`csmf train`'s. `csmf train --nproc N` launches N of these on one machine; several machines run torchrun
with their own --nnodes / --node-rank / --rdzv-endpoint (README, multi-process training)."""

from __future__ import annotations

import logging
import os
import sys

from csmf.cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    # Everything is written by now (checkpoints, run folder). Leave without the interpreter's teardown: gloo's
    # worker threads can still be joinable when C++ static destructors run, and std::terminate would abort a
    # finished run (SIGABRT, seen once in CI after a complete two-process fit).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
