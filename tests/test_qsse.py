"""QSSE-Net (paper Sec. 4.1, Eq. 1-2): the excitation, the QSSE residual blocks and the backbone."""
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, build_resnet_backbone

from qeeps_d2.modeling.qsse import (
    QSSEBasicBlock,
    QSSEBottleneckBlock,
    QuerySiameseExcitation,
    build_qsse_resnet_backbone,
)

import model_fixtures


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _reference_excitation(u, num_pairs, fc1, fc2):
    """Eq. 1 written out: s_i = sigmoid(W2 relu(W1 [z_q_i, z_g_i] + b1) + b2), z = GAP(U)."""
    z = u.mean(dim=(2, 3))
    rows = []
    for i in range(num_pairs):
        zqg = torch.cat([z[num_pairs + i], z[i]])
        hidden = torch.clamp(fc1.weight @ zqg + fc1.bias, min=0)
        rows.append(torch.sigmoid(fc2.weight @ hidden + fc2.bias))
    s = torch.stack(rows)
    return torch.cat([s, s])  # gallery rows, then query rows: the same s for both


def test_excitation_pinned_values_and_query_first_order():
    exc = QuerySiameseExcitation(channels=2, reduction=2)  # 2C=4 -> 2 -> 2
    with torch.no_grad():
        exc.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, -1.0]]))
        exc.fc1.bias.zero_()
        exc.fc2.weight.copy_(torch.tensor([[1.0, 0], [-1.0, 0]]))
        exc.fc2.bias.copy_(torch.tensor([0.0, 1.0]))
    # one pair; gallery row 0 has channel means (1, 2), query row 1 has (3, 4)
    u = torch.zeros(2, 2, 3, 3)
    u[0, 0], u[0, 1], u[1, 0], u[1, 1] = 1.0, 2.0, 3.0, 4.0
    s = exc(u, num_pairs=1)
    assert s.shape == (2, 2, 1, 1)
    # [z_q, z_g] = [3, 4, 1, 2] -> h = relu([3, -2]) = [3, 0] -> s = sigmoid([3, -3 + 1])
    expected = torch.tensor([_sigmoid(3.0), _sigmoid(-2.0)])
    assert torch.allclose(s[0, :, 0, 0], expected, atol=1e-6)
    assert torch.equal(s[0], s[1])


def test_excitation_matches_reference_on_random_pairs():
    torch.manual_seed(0)
    exc = QuerySiameseExcitation(channels=8, reduction=4)
    assert exc.fc1.weight.shape == (4, 16) and exc.fc2.weight.shape == (8, 4)
    u = torch.randn(6, 8, 5, 4)  # 3 pairs
    s = exc(u, num_pairs=3)
    assert torch.allclose(s[:, :, 0, 0], _reference_excitation(u, 3, exc.fc1, exc.fc2), atol=1e-6)
    assert torch.equal(s[:3], s[3:])
    # the excitation of pair 0 depends on its query and gallery, not on the other pairs
    u2 = u.clone()
    u2[1] += 1.0
    u2[4] -= 1.0
    s2 = exc(u2, num_pairs=3)
    assert torch.equal(s2[0], s[0]) and not torch.allclose(s2[1], s[1])


def _block_pair(qsse_cls, stock_cls, qsse_init_gate=0.0, qsse_gate_scale=1.0, **kwargs):
    torch.manual_seed(1)
    qsse_block = qsse_cls(8, 16, qsse_reduction=4, qsse_init_gate=qsse_init_gate,
                          qsse_gate_scale=qsse_gate_scale, norm="BN", **kwargs)
    stock_block = stock_cls(8, 16, norm="BN", **kwargs)
    result = stock_block.load_state_dict(qsse_block.state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == sorted(
        k for k in qsse_block.state_dict() if k.startswith("qsse.")
    )
    assert result.missing_keys == []
    return qsse_block, stock_block


BLOCKS = [
    (QSSEBottleneckBlock, BottleneckBlock, {"bottleneck_channels": 4, "stride": 2}),
    (QSSEBasicBlock, BasicBlock, {"stride": 2}),
]


@pytest.mark.parametrize("qsse_cls,stock_cls,kwargs", BLOCKS)
def test_unpaired_block_is_bit_identical_to_stock(qsse_cls, stock_cls, kwargs):
    qsse_block, stock_block = _block_pair(qsse_cls, stock_cls, **kwargs)
    x = torch.randn(3, 8, 9, 10)
    for train in (True, False):
        qsse_block.train(train)
        stock_block.train(train)
        assert qsse_block.num_pairs == 0
        assert torch.equal(qsse_block(x), stock_block(x))


@pytest.mark.parametrize("qsse_cls,stock_cls,kwargs", BLOCKS)
def test_paired_block_matches_eq2(qsse_cls, stock_cls, kwargs):
    qsse_block, stock_block = _block_pair(qsse_cls, stock_cls, **kwargs)
    qsse_block.eval()
    x = torch.randn(4, 8, 9, 10)  # 2 pairs
    if qsse_cls is QSSEBottleneckBlock:
        u = qsse_block.conv3(F.relu(qsse_block.conv2(F.relu(qsse_block.conv1(x)))))
    else:
        u = qsse_block.conv2(F.relu(qsse_block.conv1(x)))
    shortcut = qsse_block.shortcut(x)
    s = _reference_excitation(u, 2, qsse_block.qsse.fc1, qsse_block.qsse.fc2)
    expected = F.relu(shortcut + s[:, :, None, None] * u)
    qsse_block.num_pairs = 2
    out = qsse_block(x)
    assert out.shape == (4, 16, 5, 5)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, stock_block.eval()(x), atol=1e-3)


def test_batch_size_mismatch_is_an_error():
    block = QSSEBottleneckBlock(8, 8, bottleneck_channels=4, qsse_reduction=4)
    block.num_pairs = 2
    with pytest.raises(ValueError, match="2 x 2 images.*batch of 3"):
        block(torch.randn(3, 8, 4, 4))


@pytest.mark.parametrize("qsse_cls,stock_cls,kwargs", BLOCKS)
def test_freeze_keeps_qsse_trainable(qsse_cls, stock_cls, kwargs):
    qsse_block, _ = _block_pair(qsse_cls, stock_cls, **kwargs)
    qsse_block.freeze()
    for name, p in qsse_block.named_parameters():
        assert p.requires_grad == name.startswith("qsse."), name
    assert len(list(qsse_block.qsse.parameters())) == 4
    assert isinstance(qsse_block.conv1.norm, FrozenBatchNorm2d)
    assert isinstance(qsse_block.shortcut.norm, FrozenBatchNorm2d)


@pytest.mark.parametrize("qsse_cls,stock_cls,kwargs", BLOCKS)
def test_init_gate_starts_every_pair_at_that_gate(qsse_cls, stock_cls, kwargs):
    qsse_block, stock_block = _block_pair(qsse_cls, stock_cls, qsse_init_gate=0.9, **kwargs)
    qsse_block.eval()
    x = torch.randn(4, 8, 9, 10)
    if qsse_cls is QSSEBottleneckBlock:
        u = qsse_block.conv3(F.relu(qsse_block.conv2(F.relu(qsse_block.conv1(x)))))
    else:
        u = qsse_block.conv2(F.relu(qsse_block.conv1(x)))
    assert torch.allclose(qsse_block.qsse(u, 2), torch.full((4, 16, 1, 1), 0.9))
    qsse_block.num_pairs = 2
    expected = F.relu(qsse_block.shortcut(x) + 0.9 * u)
    assert torch.allclose(qsse_block(x), expected, atol=1e-5)
    # the gate still learns: fc2 gets a gradient (fc1's follows once fc2 is non-zero)
    qsse_block(x).sum().backward()
    assert qsse_block.qsse.fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="init_gate"):
        qsse_cls(8, 16, qsse_reduction=4, qsse_init_gate=1.0, norm="BN", **kwargs)


@pytest.mark.parametrize("qsse_cls,stock_cls,kwargs", BLOCKS)
def test_gate_scale_two_starts_as_the_stock_block_where_the_gate_is_steepest(
        qsse_cls, stock_cls, kwargs):
    qsse_block, stock_block = _block_pair(qsse_cls, stock_cls, qsse_init_gate=1.0,
                                          qsse_gate_scale=2.0, **kwargs)
    qsse_block.eval()
    stock_block.eval()
    x = torch.randn(4, 8, 9, 10)
    qsse_block.num_pairs = 2
    # s = 2 * sigmoid(0) = 1 exactly: the paired block is the stock block
    assert torch.allclose(qsse_block(x), stock_block(x), atol=1e-6)
    # ds / d(fc2.bias) = 2 * sigmoid'(0) = 0.5, against sigmoid'(logit 0.99) = 0.0099 at scale 1
    qsse_block(x).sum().backward()
    steep = qsse_block.qsse.fc2.bias.grad.abs().sum()
    flat_block, _ = _block_pair(qsse_cls, stock_cls, qsse_init_gate=0.99, **kwargs)
    flat_block.eval()
    flat_block.num_pairs = 2
    flat_block(x).sum().backward()
    ratio = steep / flat_block.qsse.fc2.bias.grad.abs().sum()
    assert ratio == pytest.approx(0.5 / (0.99 * 0.01), rel=0.05)
    with pytest.raises(ValueError, match="init_gate"):
        qsse_cls(8, 16, qsse_reduction=4, qsse_init_gate=2.0, qsse_gate_scale=2.0, norm="BN",
                 **kwargs)


def test_init_gate_from_config_reaches_every_block():
    cfg = model_fixtures.tiny_cfg(qsse=True)
    cfg.MODEL.QEEPS.QSSE.INIT_GATE = 0.75
    backbone = build_qsse_resnet_backbone(cfg, ShapeSpec(channels=3))
    biases = [b.qsse.fc2.bias for b in backbone.qsse_blocks]
    assert biases and all(torch.allclose(b, torch.full_like(b, math.log(3.0))) for b in biases)
    # GATE_SCALE: s = 2 * sigmoid(.), so INIT_GATE 1.5 is the same logit(0.75)
    cfg.MODEL.QEEPS.QSSE.INIT_GATE, cfg.MODEL.QEEPS.QSSE.GATE_SCALE = 1.5, 2.0
    backbone = build_qsse_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert all(b.qsse.gate_scale == 2.0 and torch.allclose(
        b.qsse.fc2.bias, torch.full_like(b.qsse.fc2.bias, math.log(3.0)))
        for b in backbone.qsse_blocks)


def _backbones(depth, stages):
    cfg = model_fixtures.tiny_cfg(qsse=True)
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth == 18:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.QEEPS.QSSE.STAGES = stages
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    shape = ShapeSpec(channels=3)
    torch.manual_seed(2)
    return build_qsse_resnet_backbone(cfg, shape), build_resnet_backbone(cfg, shape)


@pytest.mark.parametrize("depth,stages", [(50, ["res3", "res4"]), (18, ["res2", "res4"])])
def test_backbone_keeps_stock_names_and_places_qsse_in_chosen_stages(depth, stages):
    qsse_net, stock_net = _backbones(depth, stages)
    qsse_keys = [k for k in qsse_net.state_dict() if ".qsse." in k]
    assert qsse_keys
    assert sorted(set(qsse_net.state_dict()) - set(qsse_keys)) == sorted(stock_net.state_dict())
    assert qsse_net.output_shape() == stock_net.output_shape()
    qsse_cls = QSSEBasicBlock if depth == 18 else QSSEBottleneckBlock
    for name, stage in zip(qsse_net.stage_names, qsse_net.stages):
        for block in stage:
            assert isinstance(block, qsse_cls) == (name in stages), (name, type(block))
    assert len(qsse_net.qsse_blocks) == sum(
        len(stage) for name, stage in zip(qsse_net.stage_names, qsse_net.stages) if name in stages
    )
    # FREEZE_AT=2 freezes stem + res2 convolutions, not their QSSE
    for name, p in qsse_net.named_parameters():
        frozen_conv = name.startswith(("stem.", "res2.")) and ".qsse." not in name
        assert p.requires_grad != frozen_conv, name


def test_backbone_loads_stock_weights_and_pairs_couple_branches():
    qsse_net, stock_net = _backbones(50, ["res2", "res3", "res4"])
    result = qsse_net.load_state_dict(stock_net.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(".qsse." in k for k in result.missing_keys)
    qsse_net.eval()
    stock_net.eval()
    x = torch.randn(4, 3, 32, 48)
    assert torch.equal(qsse_net(x)["res4"], stock_net(x)["res4"])
    paired = qsse_net(x, num_pairs=2)["res4"]
    assert paired.shape == (4, 128, 2, 3)
    assert not torch.allclose(paired, stock_net(x)["res4"], atol=1e-4)
    # the same image on both branches of a pair: same U, same s, hence the same features
    same = qsse_net(torch.cat([x[:2], x[:2]]), num_pairs=2)["res4"]
    assert torch.allclose(same[:2], same[2:], atol=1e-6)
    with pytest.raises(ValueError, match="batch of 4"):
        qsse_net(x, num_pairs=3)
    assert all(b.num_pairs == 0 for b in qsse_net.qsse_blocks)  # reset after the error


def test_backbone_without_qsse_has_no_qsse_and_rejects_unknown_stage():
    cfg = model_fixtures.tiny_cfg(qsse=False)
    net = build_qsse_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert net.qsse_blocks == [] and not any(".qsse." in k for k in net.state_dict())
    cfg.MODEL.QEEPS.QSSE.ENABLED = True
    cfg.MODEL.QEEPS.QSSE.STAGES = ["res4", "res5"]
    with pytest.raises(ValueError, match="res5"):
        build_qsse_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_fast_pool_stem_equals_stock_stem_and_its_gradient():
    from detectron2.modeling.backbone.resnet import BasicStem

    from qeeps_d2.modeling.qsse import FastPoolStem

    torch.manual_seed(0)
    stock = BasicStem(3, 8, norm="BN").train()
    fast = FastPoolStem(3, 8, norm="BN").train()
    fast.load_state_dict(stock.state_dict())
    x = torch.randn(2, 3, 37, 50, requires_grad=True)
    y_stock, y_fast = stock(x), fast(x)
    assert y_fast.shape == (2, 8, 10, 13) and y_fast.is_contiguous()
    assert torch.equal(y_stock, y_fast)
    g = torch.randn_like(y_stock)
    (gx_stock,) = torch.autograd.grad(y_stock, x, g)
    (gx_fast,) = torch.autograd.grad(fast(x), x, g)
    assert torch.allclose(gx_stock, gx_fast, atol=1e-6)


def test_excitation_squeezes_each_image_over_its_valid_region():
    """Rows padded into a larger canvas (whatever the padding holds) give the same s as the
    unpadded rows when their valid sizes are given; without them, the whole map is averaged."""
    torch.manual_seed(0)
    exc = QuerySiameseExcitation(channels=8, reduction=4)
    gallery, query = torch.randn(1, 8, 5, 7), torch.randn(1, 8, 3, 6)
    canvas = torch.randn(2, 8, 9, 10) * 5 + 3  # the padding is anything but zero
    canvas[0, :, :5, :7], canvas[1, :, :3, :6] = gallery[0], query[0]
    sizes = torch.tensor([[5, 7], [3, 6]])
    expected = _reference_excitation(
        torch.stack([gallery.mean(dim=(2, 3))[0], query.mean(dim=(2, 3))[0]])[:, :, None, None],
        1, exc.fc1, exc.fc2,
    )
    s = exc(canvas, num_pairs=1, valid_sizes=sizes)
    assert torch.allclose(s[:, :, 0, 0], expected, atol=1e-6)
    whole = torch.tensor([[9, 10], [9, 10]])
    assert torch.allclose(exc(canvas, 1, whole), exc(canvas, 1), atol=1e-6)
    assert not torch.allclose(exc(canvas, 1), s, atol=1e-3)


def _record_qsse_inputs(net):
    """Hooks recording (U, num_pairs, valid_sizes) of every QSSE excitation, in block order."""
    seen = []
    hooks = [b.qsse.register_forward_pre_hook(lambda m, args: seen.append(args))
             for b in net.qsse_blocks]
    return seen, hooks


@pytest.mark.parametrize("depth", [50, 18])
@pytest.mark.parametrize("size", [(37, 50), (33, 49), (64, 96)])
def test_backbone_valid_extent_is_the_unpadded_feature_size(depth, size):
    """Each block's valid extent ceil(size / stride) equals the size of that block's U for the
    image run unpadded (stem conv and max-pool, stride-2 convs: n -> ceil(n / 2))."""
    qsse_net, _ = _backbones(depth, ["res2", "res3", "res4"])
    qsse_net.eval()
    h, w = size
    image = torch.randn(1, 3, h, w)
    seen, hooks = _record_qsse_inputs(qsse_net)
    with torch.no_grad():
        qsse_net(torch.cat([image, image]), num_pairs=1)
        unpadded = [u.shape[2:] for u, _, _ in seen]
        seen.clear()
        canvas = torch.zeros(2, 3, 100, 130)
        canvas[:, :, :h, :w] = image
        qsse_net(canvas, num_pairs=1, image_sizes=[(h, w), (100, 130)])
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(unpadded) == len(qsse_net.qsse_blocks)
    for (u, num_pairs, valid), extent in zip(seen, unpadded):
        assert num_pairs == 1
        assert tuple(valid[0].tolist()) == tuple(extent)
        assert tuple(valid[1].tolist()) == tuple(u.shape[2:])  # the full canvas image
    assert all(b.valid_sizes is None for b in qsse_net.qsse_blocks)  # reset after the forward
    with pytest.raises(ValueError, match="3 image_sizes for a batch of 2"):
        qsse_net(canvas, num_pairs=1, image_sizes=[(h, w)] * 3)
