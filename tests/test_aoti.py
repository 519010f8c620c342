"""AOTInductor packages of compressed models (torch._inductor.aoti_compile_and_package): the package keeps
hsv::conv2d and hsv::conv2d_epilogue as calls through the dispatcher, so loading it needs hsvkernels imported
(the op's kernels live in hsvkernels._C), and it computes what the eager model computes."""
import pytest
import torch
import torch.nn as nn

import hsvkernels
from hsvkernels.epilogue import fuse_epilogues

pytestmark = pytest.mark.skipif(not hsvkernels.build_info().get("extension"),
                                reason="the package calls the op's compiled kernels, which need the extension")


class Block(nn.Module):
    """conv -> ReLU -> conv, + input, ReLU: a ResNet basic block without BNs."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@pytest.mark.parametrize("fused", [False, True], ids=["conv2d", "conv2d_epilogue"])
def test_aoti_package_matches_eager(fused, tmp_path):
    torch.manual_seed(0)
    model = Block(32).eval()
    report = hsvkernels.convert_(model, "hsv", ratio=3, progress=False)
    assert len(report.factorized) == 2
    if fused:
        model = fuse_epilogues(model)
        assert hsvkernels.epilogue.fused_epilogues(model), "the block's tail was not fused"
    x = torch.randn(2, 32, 9, 7)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert ("hsv.conv2d_epilogue.default" if fused else "hsv.conv2d.default") in ops
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "block.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        y, x2 = runner(x), torch.randn(2, 32, 9, 7)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runner(x2), model(x2), rtol=1e-5, atol=1e-5)  # fresh input, same package
