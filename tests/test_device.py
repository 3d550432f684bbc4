"""Where training runs (runtime.device, csmf.distributed.resolve_device): the CPU by default, a GPU when asked
(an error without one), and on a GPU the MLP cascade trains, validates and hands back a CPU model whose
checkpoints resume on the CPU. The GPU tests run only where PyTorch sees a GPU (never needed: the project
runs without one; they were run on an H100 lent to this project, see the README)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from csmf.config import Config, ConfigError, override
from csmf.data.datasets import load_dataset
from csmf.distributed import resolve_device
from csmf.evaluation import evaluate
from csmf.models.csmf import CSMF

pytestmark = pytest.mark.usefixtures("one_thread")
GPU = torch.cuda.is_available()


def test_auto_is_the_cpu_without_a_gpu_and_cuda_without_one_is_an_error():
    assert resolve_device("cpu") == torch.device("cpu")
    if GPU:
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="sees no GPU"):
            resolve_device("cuda")


def _cfg(**runtime) -> Config:
    cfg = override(Config(), ["model.encoder=mlp", "model.dim=32", "train.full_softmax_max_items=0",
                              "train.aux_weight=0", "train.distill=", "train.max_epochs=2", "train.lr=0.003",
                              "cascade.min_share=0", "data.dataset=sim", "sim.n_users=400", "sim.n_items=300",
                              "sim.scenarios=3", "train.batch_size=256", "train.extra_negatives=256"])  # fmt: skip
    return replace(cfg, runtime=replace(cfg.runtime, **runtime))


def test_the_graph_encoder_is_refused_on_a_gpu_before_any_data_loads():
    from csmf.rules import check_training

    cfg = replace(_cfg(device="cuda"), model=replace(_cfg().model, encoder="graph"))
    with pytest.raises(ConfigError, match=r"runtime.device = 'cuda': model.encoder = 'graph' trains on \['cpu'\] only"):
        check_training(cfg)  # a config rule: judged without a GPU and without the data


@pytest.mark.skipif(not GPU, reason="no GPU: PyTorch sees no CUDA device here")
@pytest.mark.parametrize("amp", [False, True])
def test_the_cascade_trains_on_a_gpu_close_to_the_cpu_and_resumes_on_the_cpu(tmp_path, amp):
    data = load_dataset(_cfg())
    cpu = evaluate(CSMF(_cfg()).fit(data), data, ks=(50,))
    run = tmp_path / "run"
    model = CSMF(_cfg(device="cuda", amp=amp), run_dir=str(run)).fit(data)
    assert next(model.model.parameters()).device.type == "cpu"  # handed back on the CPU
    gpu = evaluate(model, data, ks=(50,))
    for stage in data.stages:  # another device, other kernels: close, not bit-identical
        assert abs(gpu[stage]["recall@50"] - cpu[stage]["recall@50"]) <= 0.05, (stage, gpu, cpu)
    # the GPU run's checkpoints resume on the CPU: drop the last phase and finish it there
    sorted(run.glob("phase-*.pt"))[-1].unlink()
    resumed = evaluate(CSMF(_cfg(device="cpu", amp=amp), run_dir=str(run)).fit(data), data, ks=(50,))
    for stage in data.stages:
        assert abs(resumed[stage]["recall@50"] - gpu[stage]["recall@50"]) <= 0.05, stage
