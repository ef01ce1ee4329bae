"""Models: the chapter's blocks and net, the He et al. family, the registry and the counters."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

from resnetlab.errors import UsageError
from resnetlab.models import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Residual,
    ResNet,
    check_input_size,
    count_macs,
    count_parameters,
    create_model,
    fold_batchnorm,
    layer_shapes,
    list_models,
    min_input_size,
    resnet_block,
)
from resnetlab.models.summary import model_table

ALL_MODELS = [
    "d2l_resnet18",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "preact_resnet10",
    "preact_resnet18",
    "preact_resnet34",
    "preact_resnet50",
    "preact_resnet101",
    "preact_resnet152",
]

CHAPTER_TABLE = [
    ("Sequential", torch.Size([1, 64, 56, 56])),
    ("Sequential", torch.Size([1, 64, 56, 56])),
    ("Sequential", torch.Size([1, 128, 28, 28])),
    ("Sequential", torch.Size([1, 256, 14, 14])),
    ("Sequential", torch.Size([1, 512, 7, 7])),
    ("AdaptiveAvgPool2d", torch.Size([1, 512, 1, 1])),
    ("Flatten", torch.Size([1, 512])),
    ("Linear", torch.Size([1, 10])),
]

# torchvision (3 channels, 1000 classes): parameters and multiply-adds at 224x224.
TORCHVISION = {
    "resnet18": (11_689_512, 1.814e9),
    "resnet34": (21_797_672, 3.664e9),
    "resnet50": (25_557_032, 4.089e9),
    "resnet101": (44_549_160, 7.801e9),
    "resnet152": (60_192_808, 11.514e9),
}


def meta_model(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **options)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    kinds = (Residual, BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)
    return [m for m in model.modules() if isinstance(m, kinds)]


# ----------------------------------------------------------------------------------------------
# The chapter's Residual, resnet_block and ResNet-18
# ----------------------------------------------------------------------------------------------


def test_residual_keeps_shape():
    blk = Residual(3, 3)
    assert blk(torch.rand(4, 3, 6, 6)).shape == torch.Size([4, 3, 6, 6])
    assert blk.conv3 is None


def test_residual_with_projection_halves_and_changes_channels():
    blk = Residual(3, 6, use_1x1conv=True, strides=2)
    assert blk(torch.rand(4, 3, 6, 6)).shape == torch.Size([4, 6, 3, 3])
    assert blk.conv3.kernel_size == (1, 1) and blk.conv3.stride == (2, 2)


def test_residual_is_the_chapters_code():
    blk = Residual(3, 6, use_1x1conv=True, strides=2)
    # The book's attributes; conv bias kept (PyTorch default); no BatchNorm on the projection.
    assert [n for n, _ in blk.named_children()] == ["conv1", "conv2", "conv3", "bn1", "bn2"]
    assert all(c.bias is not None for c in (blk.conv1, blk.conv2, blk.conv3))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in blk.modules()) == 2
    assert blk.conv1.stride == (2, 2) and blk.conv1.padding == (1, 1) and blk.conv2.stride == (1, 1)


def test_residual_adds_before_the_last_relu():
    blk = Residual(2, 2).eval()
    with torch.no_grad():
        for conv in (blk.conv1, blk.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.randn(1, 2, 4, 4)
    # With a zero branch (bn2 of zeros is 0 with fresh stats) the block is relu(x + 0).
    torch.testing.assert_close(blk(x), torch.relu(x))


def test_resnet_block_returns_a_list_like_the_book():
    blk = resnet_block(64, 128, 2)
    assert isinstance(blk, list) and len(blk) == 2
    assert blk[0].conv3 is not None and blk[0].conv1.stride == (2, 2)
    assert blk[1].conv3 is None and blk[1].conv1.in_channels == 128
    first = resnet_block(64, 64, 2, first_block=True)
    assert all(b.conv3 is None and b.conv1.stride == (1, 1) for b in first)


def test_d2l_resnet18_is_the_chapters_sequential():
    net = create_model("d2l_resnet18")
    assert type(net) is nn.Sequential
    assert [type(c).__name__ for c in net] == [n for n, _ in CHAPTER_TABLE]
    assert count_parameters(net) == 11_178_378
    b1 = net[0]
    assert [type(m) for m in b1] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert b1[0].kernel_size == (7, 7) and b1[0].stride == (2, 2) and b1[0].in_channels == 1
    assert all(isinstance(b, Residual) for stage in net[1:5] for b in stage)
    assert [len(stage) for stage in net[1:5]] == [2, 2, 2, 2]


def test_d2l_resnet18_shape_table_is_the_chapters():
    net = create_model("d2l_resnet18")
    assert layer_shapes(net, (1, 1, 224, 224), meta=False) == CHAPTER_TABLE
    # The chapter's own loop over the children gives the same table.
    X, table = torch.rand(1, 1, 224, 224), []
    net.eval()
    with torch.no_grad():
        for layer in net:
            X = layer(X)
            table.append((layer.__class__.__name__, X.shape))
    assert table == CHAPTER_TABLE


def test_d2l_resnet18_multiply_adds():
    net = create_model("d2l_resnet18")
    macs96 = count_macs(net, (1, 1, 96, 96), meta=False)
    assert round(macs96 / 1e9, 3) == 0.319
    assert macs96 == count_macs(net, (1, 1, 96, 96))  # meta count == real-tensor count
    assert round(count_macs(net, (1, 1, 224, 224)) / 1e9, 3) == 1.735


# ----------------------------------------------------------------------------------------------
# He et al. family, torchvision compatibility
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_parameters_and_macs(name):
    params, macs = TORCHVISION[name]
    model = meta_model(name, num_classes=1000, in_chans=3)
    assert count_parameters(model) == params
    assert count_macs(model, (1, 3, 224, 224)) == pytest.approx(macs, rel=0.005)


def test_macs_on_meta_equal_macs_on_real_tensors():
    for name in ("resnet18", "resnet50", "preact_resnet18"):
        model = create_model(name, width=16)
        assert count_macs(model, (2, 1, 64, 64)) == count_macs(model, (2, 1, 64, 64), meta=False)


def test_model_table_counts_match_the_whole_models():
    # model_table strips BatchNorm for speed; its numbers must equal counts on the full model.
    rows = {r["name"]: r for r in model_table(sizes=(64,))}
    assert list(rows) == ALL_MODELS
    for name in ("d2l_resnet18", "resnet50", "preact_resnet34"):
        model = meta_model(name)
        assert rows[name]["parameters"] == count_parameters(model)
        assert rows[name]["macs"][64] == count_macs(model, (1, 1, 64, 64))


def test_bottleneck_is_v1_5_and_projections_have_bn():
    model = meta_model("resnet50")
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.conv3.out_channels == 4 * first.conv1.out_channels == 512
    assert [type(m) for m in first.downsample] == [nn.Conv2d, nn.BatchNorm2d]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_torchvision_state_dict_names():
    model = create_model("resnet50", num_classes=1000, in_chans=3)
    sd = model.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layer2.0.downsample.1.running_var"].shape == (512,)
    assert sd["layer4.2.bn3.weight"].shape == (2048,)
    assert sd["fc.weight"].shape == (1000, 2048)
    pattern = re.compile(
        r"^(conv1\.weight|bn1\.\w+|fc\.(weight|bias)"
        r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))$"
    )
    assert [k for k in sd if not pattern.match(k)] == []
    r18 = create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    assert len(r18) == 122  # torchvision resnet18's state dict size
    assert "layer1.0.downsample.0.weight" not in r18 and r18["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)


def test_state_dict_roundtrip_strict():
    for name in ("resnet18", "preact_resnet18", "d2l_resnet18"):
        a = create_model(name, width=8).eval()
        b = create_model(name, width=8).eval()
        b.load_state_dict(a.state_dict(), strict=True)
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x))


def test_resnet_layout_and_shapes():
    model = create_model("resnet18")
    names = [n for n, _ in model.named_children()]
    assert names == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "avgpool",
        "flatten",
        "fc",
    ]
    shapes = layer_shapes(model, (1, 1, 224, 224))
    assert [n for n, _ in shapes] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Sequential",
        "Sequential",
        "Sequential",
        "Sequential",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ]
    assert shapes[0][1] == (1, 64, 112, 112) and shapes[3][1] == (1, 64, 56, 56) and shapes[7][1] == (1, 512, 7, 7)
    assert shapes[-1][1] == (1, 10)


def test_probes_leave_training_flags_alone():
    model = create_model("resnet10", width=8)
    model.train()
    model.layer1.eval()
    layer_shapes(model, (1, 1, 32, 32))
    count_macs(model, (1, 1, 32, 32), meta=False)
    assert model.training and model.layer2.training and not model.layer1.training


# ----------------------------------------------------------------------------------------------
# Every registered model trains
# ----------------------------------------------------------------------------------------------


def test_registry_lists_every_variant():
    assert list_models() == ALL_MODELS


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("stem", ["small", "imagenet"])
def test_forward_backward(name, stem):
    torch.manual_seed(0)
    model = create_model(name, width=8, stem=stem)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    params = list(model.named_parameters())
    assert params
    for pname, p in params:
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # Without zero_init_residual every parameter reaches the loss.
    assert all(p.grad.abs().sum() > 0 for _, p in params)


# ----------------------------------------------------------------------------------------------
# Pre-activation units
# ----------------------------------------------------------------------------------------------


def _call_order(block: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    calls: list[tuple[str, nn.Module]] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o, name=name: calls.append((name, mod)))
        for name, m in block.named_modules()
        if name and not isinstance(m, nn.Sequential)
    ]
    block(x)
    for h in handles:
        h.remove()
    return calls


@pytest.mark.parametrize(
    "block, last_conv",
    [
        (PreActBasicBlock(16, 32, stride=2, downsample=PreActBasicBlock.make_shortcut(16, 32, 2)), "conv2"),
        (PreActBottleneck(16, 8, stride=2, downsample=PreActBottleneck.make_shortcut(16, 32, 2)), "conv3"),
        (PreActBasicBlock(16, 16), "conv2"),
        (PreActBottleneck(32, 8), "conv3"),
    ],
)
def test_preact_unit_order(block, last_conv):
    block.eval()
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    calls = _call_order(block, x)
    first_name, first = calls[0]
    assert first_name == "bn1" and isinstance(first, nn.BatchNorm2d)
    assert first.num_features == x.shape[1]  # BN sized on the unit's input channels
    assert calls[-1][0] == last_conv  # nothing, in particular no ReLU, after the addition
    # BN -> ReLU -> conv for every conv of the branch.
    names = [n for n, _ in calls if n != "downsample.0"]
    convs = [i for i, n in enumerate(names) if n.startswith("conv")]
    for i in convs:
        assert names[i - 2].startswith("bn") and names[i - 1] == "relu"
    with torch.no_grad():
        out = block(x)
    assert (out < 0).any()  # a ReLU after the sum could not produce negatives


def test_preact_projection_reads_the_preactivated_input():
    block = PreActBasicBlock(8, 16, stride=2, downsample=PreActBasicBlock.make_shortcut(8, 16, 2)).eval()
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-1, 1)
        block.bn1.running_var.uniform_(0.5, 2)
    seen = []
    block.downsample.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].clone()))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block(x)
        expected = torch.relu(block.bn1(x))
    torch.testing.assert_close(seen[0], expected)
    assert [type(m) for m in block.downsample] == [nn.Conv2d]


def test_preact_resnet_layout():
    model = create_model("preact_resnet18")
    names = [n for n, _ in model.named_children()]
    assert names[-6:] == ["layer4", "final_bn", "final_relu", "avgpool", "flatten", "fc"]
    assert model.layer1[0].bn1.num_features == 64 and model.layer2[0].bn1.num_features == 64
    assert model.layer2[0].downsample[0].weight.shape == (128, 64, 1, 1)
    shapes = layer_shapes(model, (1, 1, 96, 96))
    assert [n for n, _ in shapes][-5:] == ["BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert meta_model("preact_resnet50").final_bn.num_features == 2048


def test_plain_blocks_end_with_relu():
    block = BasicBlock(8, 8).eval()
    assert (block(torch.randn(2, 8, 5, 5)) >= 0).all()
    calls = _call_order(block, torch.randn(2, 8, 5, 5))
    assert calls[-1][0] == "relu" and calls[-2][0] == "bn2"


# ----------------------------------------------------------------------------------------------
# zero_init_residual
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_zero_init_residual_zeroes_the_last_step(name):
    real = create_model(name, zero_init_residual=True, width=4)
    default = create_model(name, width=4)
    assert len(blocks_of(real)) == len(blocks_of(default)) > 0
    for zeroed, untouched in zip(blocks_of(real), blocks_of(default)):
        attr = {Bottleneck: "bn3", PreActBottleneck: "conv3", PreActBasicBlock: "conv2"}.get(type(zeroed), "bn2")
        assert torch.count_nonzero(getattr(zeroed, attr).weight) == 0
        assert torch.count_nonzero(getattr(untouched, attr).weight) > 0
    assert real.options["zero_init_residual"] is True


@pytest.mark.parametrize("name", ["d2l_resnet18", "resnet18", "resnet50", "preact_resnet18", "preact_resnet50"])
def test_zero_init_blocks_start_as_their_shortcut(name):
    model = create_model(name, zero_init_residual=True, width=4, stem="small").eval()
    for block in blocks_of(model):
        cin = block.conv1.in_channels
        x = torch.randn(2, cin, 8, 8)
        with torch.no_grad():
            out = block(x)
            if isinstance(block, Residual):
                shortcut = x if block.conv3 is None else block.conv3(x)
            elif block.downsample is None:
                shortcut = x
            elif block.preact:
                shortcut = block.downsample(torch.relu(block.bn1(x)))
            else:
                shortcut = block.downsample(x)
        expected = shortcut if getattr(block, "preact", False) else torch.relu(shortcut)
        torch.testing.assert_close(out, expected)


# ----------------------------------------------------------------------------------------------
# Options and the model contract
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract_rebuilds(name):
    model = meta_model(name, num_classes=7, in_chans=3, stem="small", width=16, max_width=64, zero_init_residual=True)
    assert model.name == name
    assert model.options == {
        "num_classes": 7,
        "in_chans": 3,
        "stem": "small",
        "width": 16,
        "max_width": 64,
        "zero_init_residual": True,
    }
    assert json.loads(json.dumps(model.options)) == model.options
    again = meta_model(model.name, **model.options)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_small_stem_and_width():
    model = create_model("resnet18", stem="small", width=16)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert layer_shapes(model, (1, 1, 32, 32))[7] == ("Sequential", torch.Size([1, 128, 4, 4]))
    net = create_model("d2l_resnet18", stem="small", width=16)
    assert [type(m) for m in net[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert net[0][0].kernel_size == (3, 3) and net[0][0].stride == (1, 1)
    assert layer_shapes(net, (1, 1, 28, 28))[4] == ("Sequential", torch.Size([1, 128, 4, 4]))
    assert net[-1].in_features == 128
    assert meta_model("resnet50", width=16).fc.in_features == 16 * 8 * 4


def test_max_width_caps_the_later_stages():
    model = create_model("resnet18", stem="small", width=16, max_width=32)
    widths = [stage[-1].conv2.out_channels for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]
    assert widths == [16, 32, 32, 32]
    assert model.layer4[0].downsample is not None  # stride 2 still needs a projection at equal channels
    assert layer_shapes(model, (1, 1, 32, 32))[7] == ("Sequential", torch.Size([1, 32, 4, 4]))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert meta_model("resnet50", width=16, max_width=32).fc.in_features == 32 * 4
    net = create_model("d2l_resnet18", stem="small", width=16, max_width=32)
    assert layer_shapes(net, (1, 1, 28, 28))[3:5] == [
        ("Sequential", torch.Size([1, 32, 7, 7])),
        ("Sequential", torch.Size([1, 32, 4, 4])),
    ]
    assert net[-1].in_features == 32
    # A cap at or above the last stage's width changes nothing.
    for name in ("resnet18", "d2l_resnet18"):
        shapes = {k: v.shape for k, v in meta_model(name, width=16).state_dict().items()}
        assert {k: v.shape for k, v in meta_model(name, width=16, max_width=128).state_dict().items()} == shapes


def test_resnet_class_directly():
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, in_chans=2, width=4)
    assert model(torch.randn(2, 2, 16, 16)).shape == (2, 3)
    with pytest.raises(UsageError, match="layers must be 4 positive"):
        ResNet(BasicBlock, [1, 1, 1])
    with pytest.raises(UsageError, match="block must be"):
        ResNet(nn.Conv2d, [1, 1, 1, 1])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"width": True}, "width must be a positive integer, got True"),
        ({"width": 8.0}, "width must be a positive integer, got 8.0"),
        ({"stem": "tiny"}, "unknown stem 'tiny'; use 'imagenet'"),
        ({"num_classes": 0}, "num_classes must be a positive integer, got 0"),
        ({"in_chans": 0}, "in_chans must be a positive integer, got 0"),
        ({"in_chans": -1}, "in_chans must be a positive integer, got -1"),
        ({"zero_init_residual": "yes"}, "zero_init_residual must be True or False"),
        ({"width": 16, "max_width": 8}, "max_width must be None or an integer of at least the width (16), got 8"),
        ({"max_width": "128"}, "max_width must be None or an integer of at least the width (64), got '128'"),
        ({"max_width": True}, "max_width must be None or an integer of at least the width (64), got True"),
        ({"widht": 8}, "unknown option 'widht' for resnet18; did you mean width?"),
        ({"dropout": 0.1}, "unknown option 'dropout' for resnet18; valid options: num_classes, in_chans, stem"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(UsageError) as info:
        create_model("resnet18", **options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_options_on_d2l_net_too():
    with pytest.raises(UsageError, match="width must be"):
        create_model("d2l_resnet18", width=-4)
    with pytest.raises(UsageError, match="unknown stem"):
        create_model("d2l_resnet18", stem="cifar")
    with pytest.raises(UsageError, match="max_width must be"):
        create_model("d2l_resnet18", max_width=32)


def test_unknown_name_suggests_closest():
    with pytest.raises(UsageError) as info:
        create_model("resnet19")
    msg = str(info.value)
    assert msg.startswith("unknown model 'resnet19'; did you mean resnet18, resnet10")
    assert msg.endswith("(see `resnetlab models`)")
    with pytest.raises(UsageError, match="did you mean preact_resnet50"):
        create_model("preact_resnet5")
    with pytest.raises(UsageError, match="choose one of d2l_resnet18, resnet10"):
        create_model("vgg")
    assert create_model(" ResNet10 ", width=4).name == "resnet10"


# ----------------------------------------------------------------------------------------------
# Input size limits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_min_input_size_of_registered_models(name):
    # Padded stride-2 convs and the padded max-pool output ceil(H/2) >= 1: nothing vanishes.
    assert min_input_size(name) == 1
    assert min_input_size(name, stem="small", width=8) == 1


def test_smallest_input_really_runs():
    model = create_model("resnet18", width=8).eval()
    assert min_input_size(model) == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 1, 1)).shape == (1, 10)
    check_input_size(model, 1)
    with pytest.raises(
        UsageError, match=r"^input 0x0 is too small for resnet18 \(stem imagenet\); the smallest it accepts is 1x1$"
    ):
        check_input_size(model, 0)


def test_min_input_size_is_computed_for_any_module():
    # Unpadded 3x3 conv, 2x2 pool, unpadded 3x3 conv: needs floor((H - 2) / 2) >= 3, so H >= 8.
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.Flatten())
    assert min_input_size(net) == 8
    net(torch.randn(1, 2, 8, 8))
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 2, 7, 7))
    check_input_size(net, 8)
    with pytest.raises(UsageError, match=r"^input 7x7 is too small for Sequential; the smallest it accepts is 8x8$"):
        check_input_size(net, 7)
    with pytest.raises(UsageError, match="input 20x7 is too small"):
        check_input_size(net, (20, 7))


def test_count_parameters_trainable_only():
    model = create_model("resnet10", width=4)
    total = count_parameters(model)
    model.fc.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc.weight.numel()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_batchnorm_folds_for_evaluation_with_the_same_logits(name):
    torch.manual_seed(0)
    net = create_model(name, stem="small").eval()
    for module in net.modules():  # statistics away from the defaults (mean 0, var 1), as after training
        if isinstance(module, nn.BatchNorm2d):
            (
                module.running_mean.uniform_(-0.5, 0.5),
                module.running_var.uniform_(0.5, 2),
                module.weight.data.uniform_(0.5, 2),
            )
    folded = fold_batchnorm(net)
    left = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if name.startswith("preact"):  # the norms before a convolution stay
        assert 0 < left < sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    else:  # every norm follows a convolution, the projection shortcuts' included
        assert left == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits = net(x)
        # rounding error relative to the largest logit: the deep pre-activation models' logits reach 1e10 here
        scale = logits.abs().max().clamp(min=1)
        torch.testing.assert_close(folded(x) / scale, logits / scale, rtol=1e-4, atol=1e-4)
    assert all(m.training is False for m in folded.modules()) and logits.shape == (2, 10)


@pytest.mark.parametrize("sync", ["torch", "cpu"])
def test_synchronised_batchnorm_folds_like_plain_batchnorm(sync):
    """Distributed runs evaluate a model whose BatchNorm is synchronised: it folds, with the same logits."""
    from resnetlab.train.syncbn import convert_sync_batchnorm

    net = create_model("resnet10", width=8, stem="small").eval()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2)
    synced = copy.deepcopy(net)
    synced = (
        nn.SyncBatchNorm.convert_sync_batchnorm(synced)
        if sync == "torch"
        else convert_sync_batchnorm(synced, torch.device("cpu"))
    )
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    folded = fold_batchnorm(synced.eval())

    def norms(m: nn.Module) -> int:
        return sum(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in m.modules())

    assert norms(folded) == norms(fold_batchnorm(net)) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
