"""narrow_mm's kernels on a real GPU (skipped without one): a programmatic dependent launch
reads what the kernel before it wrote, inside a CUDA graph as in a decode step."""
from __future__ import annotations

import pytest
import torch

from llmenergy.inference import narrow_mm as nm
from llmenergy.inference import quant

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or nm.triton is None,
    reason="needs a CUDA GPU with Triton: programmatic dependent launches exist only there")


@pytest.mark.parametrize("rows", [1, 16])  # the GEMV (decode at batch 1) and the tl.dot form
def test_pdl_launch_reads_the_output_of_a_slow_kernel_before_it(rows: int) -> None:
    """Each product's input is the output of a long reduction launched just before it. Were the
    wait missing, the product would read the input the reduction had not written yet (the
    previous round's values). The outputs must equal those of the same launches made with the
    input already written and the GPU synchronised, bit for bit."""
    dev = torch.device("cuda", torch.cuda.current_device())
    if not nm.pdl_enabled(dev):
        pytest.skip("this GPU or Triton takes no programmatic dependent launch (before Hopper, "
                    "no gdc_wait in Triton, or LLMENERGY_PDL=0)")
    g = torch.Generator(dev).manual_seed(0)
    n, k, tall = 4096, 4096, 8192
    q, scale = quant.quantize_int8(torch.randn(n, k, device=dev, generator=g, dtype=torch.float16))
    scale = scale.to(torch.float16)
    # the reduction reads 64 MB before it writes x: time for a launch that does not wait to
    # read stale values
    sources = [torch.randn(tall, rows, k, device=dev, generator=g, dtype=torch.float16) / tall ** 0.5
               for _ in range(3)]
    x = torch.zeros(rows, k, device=dev, dtype=torch.float16)
    outs = [torch.empty(rows, n, device=dev, dtype=torch.float16) for _ in range(6)]

    def rounds() -> None:
        for i, out in enumerate(outs):
            torch.sum(sources[i % 3], dim=0, out=x)
            nm.launch(x, q, scale, out)

    want = []
    for i in range(len(outs)):
        xi = torch.empty_like(x)
        torch.sum(sources[i % 3], dim=0, out=xi)
        torch.cuda.synchronize()
        out = torch.empty(rows, n, device=dev, dtype=torch.float16)
        nm.launch(xi, q, scale, out)
        torch.cuda.synchronize()
        want.append(out)
    rounds()  # compiles the kernels; eagerly, on the stream
    torch.cuda.synchronize()
    for got, w in zip(outs, want):
        assert torch.equal(got, w)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        rounds()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(20):
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for got, w in zip(outs, want):
            assert torch.equal(got, w)
