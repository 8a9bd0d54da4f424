import pytest
import torch
from torch import nn

from torchslim.measure import artifact_bytes, count_macs, count_nonzero_params, count_params


def test_conv_and_linear_macs_match_the_textbook_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 8 * 8 * 3 * 9
    assert count_macs(nn.Linear(10, 5), torch.randn(4, 10)) == 4 * 10 * 5
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert count_macs(grouped, torch.randn(1, 8, 6, 6)) == 6 * 6 * 8 * 9


def test_resnet50_has_25_6_m_params_and_4_1_g_macs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50().eval()
    assert count_params(model) == 25_557_032
    assert count_macs(model, torch.randn(1, 3, 224, 224)) == pytest.approx(4.09e9, rel=0.01)


def test_params_count_tied_weights_once_and_nonzero_counts_zeros():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert count_params(model) == 16
    with torch.no_grad():
        model[0].weight[:2].zero_()
    assert count_nonzero_params(model) == 8


def test_artifact_bytes_raw_and_compressed(tmp_path):
    dense = tmp_path / "dense.bin"
    dense.write_bytes(torch.randn(10_000).numpy().tobytes())
    sparse = tmp_path / "sparse.bin"
    sparse.write_bytes(bytes(40_000))
    raw, shipped = artifact_bytes(dense)
    assert raw == 40_000 and shipped > 30_000  # random floats barely compress
    raw, shipped = artifact_bytes(sparse)
    assert raw == 40_000 and shipped < 1_000  # zeros compress away
    assert artifact_bytes(tmp_path)[0] == 80_000  # a folder sums its files


def test_packed_weight_only_matmuls_count_the_macs_of_the_float_layer():
    from torchslim.quant.weight_only import WeightOnlyLinear

    layer = torch.nn.Linear(256, 512)
    for bits, group in ((4, 128), (8, 0)):
        packed = WeightOnlyLinear.from_float(layer, bits=bits, group_size=group)
        for rows in (1, 3):
            expected = rows * 256 * 512
            assert count_macs(packed, torch.randn(rows, 256)) == count_macs(layer, torch.randn(rows, 256)) == expected
