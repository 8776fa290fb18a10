"""CUDA paths of the core (run with `pytest -m gpu` on a GPU machine; skipped with the reason elsewhere)."""

import pytest
import torch

from course_utils import config, hardware, timing
from course_utils.quant import rtn
from course_utils.quant.linear import QuantLinear, RTNConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_device_picks_cuda():
    assert config.device("auto") == "cuda"
    assert hardware.gpus() and hardware.gpus()[0].memory_gib > 1


def test_cuda_bandwidth_probe_is_plausible_against_the_datasheet():
    measured = timing.measure_bandwidth(device="cuda").gbps
    peak = hardware.gpus()[0].peak_bandwidth_gbps
    assert measured > 100
    if peak:
        # a streaming sum reaches a good part of the datasheet figure; beyond it, the probe or the table is wrong
        assert 0.3 * peak < measured < 1.05 * peak


def test_benchmark_waits_for_the_gpu():
    a = torch.randn(4096, 4096, device="cuda")
    result = timing.benchmark(lambda: a @ a, warmup=2, repeat=5, device="cuda")
    flops = 2 * 4096**3 / result.median_s
    assert flops < 2e15, "a time this short means the benchmark did not synchronise"


@pytest.mark.parametrize("bits,group,symmetric", [(8, "channel", True), (4, 64, True), (3, 32, False)])
def test_rtn_codes_on_cuda_equal_cpu(bits, group, symmetric):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    cpu = rtn.quantize(w, bits, group, symmetric)
    gpu = rtn.quantize(w.cuda(), bits, group, symmetric)
    assert torch.equal(cpu.codes, gpu.codes.cpu())
    assert torch.allclose(cpu.scales, gpu.scales.cpu())


def test_quant_linear_runs_on_cuda():
    linear = torch.nn.Linear(512, 256).cuda()
    q = QuantLinear.from_linear(linear, RTNConfig(4, 64)).cuda()
    x = torch.randn(2, 512, device="cuda")
    assert torch.allclose(q(x), x @ q.dequantized_weight().T + linear.bias, atol=1e-4)  # 512-term float32 sums, two orders


def test_default_model_perplexity_on_cuda_matches_cpu(default_on_cuda):
    from course_utils import evaluate, models

    _, _, windows, gpu_ppl = default_on_cuda
    cpu_model, _ = models.load_model("default", "cpu")
    cpu_ppl = evaluate.perplexity(cpu_model, windows).value
    assert abs(gpu_ppl / cpu_ppl - 1) < 0.005  # float32 on both: only the order of the sums differs
