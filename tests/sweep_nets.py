"""Every class of ``monai.networks.nets``: a tiny builder for those that classify or segment images, a reason for the rest.

Shared by ``test_sweep.py`` (the sweep and its completeness check) and docs/networks.md (the support table).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.networks import nets
from torch import nn

CLASSES = 3


@dataclass(frozen=True)
class Case:
    """One in-scope network class: ``build(spatial_dims) -> (network, input shape without batch, segmentation)``."""

    build: Callable[[int], tuple[nn.Module, tuple[int, ...], bool]]
    dims: tuple[int, ...] = (2, 3)
    in_channels: int = 1


class FirstOf(nn.Module):
    """Keep one output of a network returning a tuple or dict (``key``): relevance and losses need one tensor."""

    def __init__(self, net: nn.Module, key: int | str = 0):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[self.key]


def _size(sd: int, d2: int = 32, d3: int = 16) -> tuple[int, ...]:
    return (d2,) * sd if sd == 2 else (d3,) * sd


def _densenet(cls):
    def build(sd):
        net = cls(
            spatial_dims=sd, in_channels=1, out_channels=CLASSES, init_features=8, growth_rate=4, block_config=(2, 2),
            bn_size=2,
        )  # fmt: skip
        return net, _size(sd, 32, 32), False

    return Case(build)


def _senet(cls, **kw):
    # SENet's widths are fixed (64..512 x expansion); one block per stage keeps it small
    def build(sd):
        return (
            cls(spatial_dims=sd, in_channels=1, num_classes=CLASSES, layers=(1, 1, 1, 1), **kw),
            _size(sd),
            False,
        )

    return Case(build)


def _seg(fn, d2=32, d3=16, dims=(2, 3)):
    return Case(lambda sd: (fn(sd), _size(sd, d2, d3), True), dims)


def _cls(fn, d2=32, d3=16, dims=(2, 3)):
    return Case(lambda sd: (fn(sd), _size(sd, d2, d3), False), dims)


def _bn_calibrated(net: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``net`` with batch-norm statistics of one random batch, as in any trained network.

    MONAI's EfficientNet init (fan-out normal) shrinks activations at each of B0's 16 depthwise blocks while the
    norms still hold mean 0 / var 1: activations of ~1e-14, which LRP's epsilon (1e-6) absorbs (all-zero relevance).
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one batch sets the statistics
    net.train()
    with torch.no_grad():
        net(torch.randn(2, *shape))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return net.eval()


def _efficientnet(sd):
    blocks = ["r1_k3_s11_e1_i32_o16_se0.25", "r1_k3_s22_e4_i16_o24_se0.25", "r1_k5_s22_e4_i24_o40_se0.25"]
    return nets.EfficientNet(
        blocks, spatial_dims=sd, in_channels=1, num_classes=CLASSES, width_coefficient=0.5
    )


def _dints(sd):
    space = nets.TopologyInstance(
        channel_mul=0.25, num_blocks=2, num_depths=3, spatial_dims=sd, use_downsample=True
    )
    return nets.DiNTS(space, in_channels=1, num_classes=2, spatial_dims=sd)


def _vit(sd):
    net = nets.ViT(
        in_channels=1, img_size=_size(sd), patch_size=(8,) * sd, hidden_size=48, mlp_dim=96, num_layers=2,
        num_heads=4, spatial_dims=sd, classification=True, num_classes=CLASSES,
    )  # fmt: skip
    return FirstOf(net)  # (logits, hidden states)


def _unetr(sd):
    return nets.UNETR(
        in_channels=1, out_channels=2, img_size=_size(sd), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4,
        spatial_dims=sd,
    )  # fmt: skip


def _swinunetr(sd):  # 3D at 32^3 has a 1-voxel bottleneck: batch norm instead of instance norm there
    return nets.SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, spatial_dims=sd, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3),
        norm_name="instance" if sd == 2 else "batch",
    )  # fmt: skip


def _highresnet(sd):
    layers = (
        {"name": "conv_0", "n_features": 4, "kernel_size": 3},
        {"name": "res_1", "n_features": 4, "kernels": (3, 3), "repeat": 1},
        {"name": "res_2", "n_features": 8, "kernels": (3, 3), "repeat": 1},
        {"name": "res_3", "n_features": 16, "kernels": (3, 3), "repeat": 1},
        {"name": "conv_1", "n_features": 16, "kernel_size": 1},
        {"name": "conv_2", "kernel_size": 1},
    )
    return nets.HighResNet(spatial_dims=sd, in_channels=1, out_channels=2, layer_params=layers)


def _netadapter(sd):
    backbone = nets.ResNet("basic", (1, 1, 1, 1), (8, 16, 32, 64), spatial_dims=sd, n_input_channels=1)
    return nets.NetAdapter(backbone, num_classes=CLASSES, dim=sd, pool=None)


def _mil(sd):
    class Bag(nn.Module):  # MILModel takes [B, N, C, H, W] bags; one bag of two 2D patches per image here
        def __init__(self):
            super().__init__()
            self.net = nets.MILModel(num_classes=CLASSES, pretrained=False, trans_blocks=1)

        def forward(self, x):
            return self.net(x.unsqueeze(1).expand(-1, 2, 3, -1, -1))

    return Bag()


IN_SCOPE: dict[str, Case] = {
    "AHNet": _seg(  # fixed widths (64..2048); its pyramid pooling needs 64^2 / 32^3
        lambda sd: nets.AHNet(
            layers=(1, 1, 1, 1), spatial_dims=sd, in_channels=1, out_channels=2, psp_block_num=1
        ),
        64,
        32,
    ),
    "AttentionUnet": _seg(
        lambda sd: nets.AttentionUnet(sd, 1, 2, channels=(8, 16, 32), strides=(2, 2)),
    ),
    "BasicUNet": _seg(  # four poolings: 3D needs 32^3 to keep > 1 voxel for instance norm
        lambda sd: nets.BasicUNet(
            spatial_dims=sd, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8)
        ),
        32,
        32,
    ),
    "BasicUNetPlusPlus": _seg(
        lambda sd: FirstOf(
            nets.BasicUNetPlusPlus(
                spatial_dims=sd, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8)
            )
        ),
        32,
        32,
    ),
    "Classifier": _cls(
        lambda sd: nets.Classifier((1, *_size(sd)), CLASSES, channels=(8, 16, 32), strides=(2, 2, 2)),
    ),
    "DAF3D": _seg(lambda sd: nets.DAF3D(in_channels=1, out_channels=2), dims=(3,), d3=32),
    "DenseNet": _densenet(nets.DenseNet),
    "DenseNet121": _densenet(nets.DenseNet121),
    "DenseNet169": _densenet(nets.DenseNet169),
    "DenseNet201": _densenet(nets.DenseNet201),
    "DenseNet264": _densenet(nets.DenseNet264),
    "DiNTS": _seg(_dints, 32, 16),
    "DynUNet": _seg(
        lambda sd: nets.DynUNet(
            sd,
            1,
            2,
            kernel_size=(3, 3, 3),
            strides=(1, 2, 2),
            upsample_kernel_size=(2, 2),
            filters=(8, 16, 32),
            res_block=True,
            deep_supervision=True,
            deep_supr_num=1,
        )  # fmt: skip
    ),
    "EfficientNet": _cls(_efficientnet),
    "EfficientNetBN": _cls(
        lambda sd: _bn_calibrated(
            nets.EfficientNetBN(
                "efficientnet-b0", pretrained=False, spatial_dims=sd, in_channels=1, num_classes=CLASSES
            ),
            (1,) + _size(sd, 32, 32),
        ),
        32,
        32,
    ),
    "FlexibleUNet": _seg(  # EfficientNet-B0 encoder: batch norms calibrated as for EfficientNetBN
        lambda sd: _bn_calibrated(
            nets.FlexibleUNet(1, 2, "efficientnet-b0", spatial_dims=sd, decoder_channels=(16, 16, 8, 8, 8)),
            (1,) + _size(sd, 64, 32),
        ),
        64,
        32,
    ),
    "HighResNet": _seg(_highresnet),
    "HoVerNet": _seg(
        lambda sd: FirstOf(nets.HoVerNet(in_channels=1, decoder_padding=True), "nucleus_prediction"),
        256,
        dims=(2,),
    ),
    "MILModel": _cls(_mil, 32, dims=(2,)),
    "MedNeXt": _seg(
        lambda sd: nets.MedNeXt(
            spatial_dims=sd,
            init_filters=8,
            in_channels=1,
            out_channels=2,
            kernel_size=3,
            blocks_down=(1, 1, 1, 1),
            blocks_bottleneck=1,
            blocks_up=(1, 1, 1, 1),
            use_residual_connection=True,
        ),  # fmt: skip
        32,
        32,  # four downsamplings: 16^3 leaves one voxel for its group norm
    ),
    "NetAdapter": _cls(_netadapter),
    "Quicknat": _seg(lambda sd: nets.Quicknat(num_classes=2, num_channels=1, num_filters=8), 32, dims=(2,)),
    "ResNet": _cls(
        lambda sd: nets.ResNet(
            "bottleneck",
            (1, 1, 1, 1),
            (8, 16, 32, 64),
            spatial_dims=sd,
            n_input_channels=1,
            num_classes=CLASSES,
        )  # fmt: skip
    ),
    "SENet": _senet(nets.SENet, block="se_bottleneck", groups=1, reduction=16),
    "SENet154": _senet(nets.SENet154),
    "SEResNet50": _senet(nets.SEResNet50),
    "SEResNet101": _senet(nets.SEResNet101),
    "SEResNet152": _senet(nets.SEResNet152),
    "SEResNeXt50": _senet(nets.SEResNeXt50),
    "SEResNeXt101": _senet(nets.SEResNeXt101),
    "SegResNet": _seg(
        lambda sd: nets.SegResNet(spatial_dims=sd, in_channels=1, out_channels=2, init_filters=8)
    ),
    "SegResNetDS": _seg(
        lambda sd: nets.SegResNetDS(spatial_dims=sd, init_filters=8, in_channels=1, out_channels=2)
    ),
    "SegResNetDS2": _seg(
        lambda sd: nets.SegResNetDS2(spatial_dims=sd, init_filters=8, in_channels=1, out_channels=2)
    ),
    "SegResNetVAE": _seg(
        lambda sd: FirstOf(
            nets.SegResNetVAE(
                _size(sd), spatial_dims=sd, init_filters=8, in_channels=1, out_channels=2, vae_nz=16
            )
        )
    ),
    "SwinUNETR": Case(lambda sd: (_swinunetr(sd), _size(sd, 64, 32), True)),
    "TorchVisionFCModel": Case(
        lambda sd: (nets.TorchVisionFCModel("resnet18", CLASSES, pool=None), (64, 64), False),
        (2,),
        in_channels=3,
    ),
    "UNETR": _seg(_unetr),
    "UNet": _seg(
        lambda sd: nets.UNet(sd, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2),
    ),
    "VNet": _seg(
        lambda sd: nets.VNet(spatial_dims=sd, in_channels=1, out_channels=2, dropout_prob_down=None), 32, 16
    ),
    "ViT": _cls(_vit),
}

GENERATIVE = "generative model (autoencoder / diffusion / GAN part): no class or mask output to explain"
REGISTRATION = "registration network: predicts a displacement field, not classes"
TEXT = "text or vision-language model (BERT parts)"
BLOCK = "a building block or search space, not a network of its own"
BACKBONE = "feature extractor returning a list of feature maps; pruned inside the networks that use it"

OUT_OF_SCOPE: dict[str, str] = {
    **dict.fromkeys(
        [
            "AutoEncoder",
            "AutoencoderKL",
            "ControlNet",
            "DecoderOnlyTransformer",
            "DiffusionModelUNet",
            "Generator",
            "MaskedAutoEncoderViT",
            "SPADEAutoencoderKL",
            "SPADEDiffusionModelUNet",
            "SPADENet",
            "VQVAE",
            "VarAutoEncoder",
            "ViTAutoEnc",
            "Critic",
            "Discriminator",
            "PatchDiscriminator",
            "MultiScalePatchDiscriminator",
            "VarFullyConnectedNet",
        ],
        GENERATIVE,
    ),  # fmt: skip
    **dict.fromkeys(["GlobalNet", "LocalNet", "RegUNet", "VoxelMorph", "VoxelMorphUNet"], REGISTRATION),
    **dict.fromkeys(
        [
            "Transchex",
            "MultiModal",
            "BertAttention",
            "BertMixedLayer",
            "BertOutput",
            "BertPreTrainedModel",
            "Pooler",
        ],
        TEXT,
    ),
    **dict.fromkeys(
        [
            "BlockArgs",
            "FlexUNetEncoderRegister",
            "HighResBlock",
            "PatchMerging",
            "PatchMergingV2",
            "ResNetBlock",
            "ResNetBottleneck",
            "TopologyConstruction",
            "TopologyInstance",
            "TopologySearch",
        ],
        BLOCK,
    ),  # fmt: skip
    **dict.fromkeys(
        ["EfficientNetBNFeatures", "EfficientNetEncoder", "ResNetEncoder", "ResNetFeatures"], BACKBONE
    ),
    "FullyConnectedNet": "takes 1-D feature vectors, not images",
    "Regressor": "regresses values (no class or mask to explain); its subclass Classifier is covered",
    "VISTA3D": "promptable segmentation: forward needs point or class prompts; its encoder SegResNetDS2 is covered",
    "NaViT": "takes lists of variable-size images packed into token sequences, not a batch tensor",
    "HyenaNDUNETR": "needs the optional nvsubquadratic package (not installed here); otherwise SwinUNETR's path",
}


def network_classes() -> dict[str, type]:
    """``{name: class}`` of every class in ``monai.networks.nets``, one name per class (aliases dropped)."""
    by_class: dict[type, list[str]] = {}
    for name, cls in inspect.getmembers(nets, inspect.isclass):
        by_class.setdefault(cls, []).append(name)
    known = set(IN_SCOPE) | set(OUT_OF_SCOPE)
    # the listed spelling when one alias is listed, else the class's own __name__
    return {next((n for n in names if n in known), cls.__name__): cls for cls, names in by_class.items()}
