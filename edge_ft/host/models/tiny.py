"""MLPerf Tiny's reference models (mlcommons/tiny, benchmark/training/) as torch modules.

Each reproduces the layer structure of the Keras definition it names: same layers, kernels, strides, channel
counts and bias flags (Keras layers keep their bias by default, so the convolutions before BatchNorm do too).
Parameter counts are torch's (BatchNorm's running statistics are buffers, not parameters); the Keras summary
counts those too and is given for comparison. Two deliberate differences, both shape-preserving:
  - Keras 'same' padding pads a strided convolution asymmetrically (the extra row/column at the bottom/right);
    torch pads symmetrically. Output shapes and parameter counts are identical; a Keras checkpoint would need
    its stride-2 inputs shifted by one pixel to load bit-exactly.
  - Softmax is not part of the model: the training step applies cross-entropy to the logits.
Every model runs in eval mode during fine-tuning on the device: BatchNorm uses its frozen running statistics
(only its affine weight and bias can train) and Dropout is the identity.

Module names read well in adapters: the layers are `features.N` (an nn.Sequential) and the head is `classifier`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn_relu(c_in: int, c_out: int, kernel, stride=1, padding=0, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups), nn.BatchNorm2d(c_out), nn.ReLU()]


class ResidualStack(nn.Module):
    """One ResNet-8 stack: conv-BN-ReLU-conv-BN plus the shortcut (a 1x1 strided conv, no BN, when the shape
    changes), then ReLU (image_classification/keras_model.py)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.shortcut(x) + y)


class ResNet8(nn.Module):
    """ResNet-8 for CIFAR-10 (`resnet_v1_eembc`): (B,3,32,32) -> (B,10).

    stem conv3x3 16 + BN + ReLU; three residual stacks of 16, 32 (stride 2) and 64 (stride 2) filters; average
    pool 8x8; flatten; dense. 9 convolutions (7 3x3, 2 1x1 shortcuts), 7 BatchNorms, 1 dense layer.
    78,186 parameters (Keras summary: 78,666 with the 480 BatchNorm moving statistics).
    """

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 16, 3, padding=1),  # features.0-2: (B,16,32,32)
            ResidualStack(16, 16, 1),  # features.3: (B,16,32,32)
            ResidualStack(16, 32, 2),  # features.4: (B,32,16,16)
            ResidualStack(32, 64, 2),  # features.5: (B,64,8,8)
            nn.AvgPool2d(8),  # features.6: (B,64,1,1)
            nn.Flatten(),  # features.7: (B,64)
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DSCNN(nn.Module):
    """DS-CNN (small) for keyword spotting on 49x10 MFCC frames (keyword_spotting/keras_model.py, 'ds_cnn'):
    (B,1,49,10) -> (B,12).

    conv 10x4 stride 2 to 64 channels + BN + ReLU + Dropout(0.2); four depthwise-separable blocks (depthwise 3x3
    + BN + ReLU, pointwise 1x1 + BN + ReLU); Dropout(0.4); average pool 24x5 (Keras' int(49/2) x int(10/2) over
    the 25x5 map, so the last row is dropped, as there); flatten; dense. 9 convolutions (4 depthwise), 9
    BatchNorms, 1 dense layer. 23,756 parameters (Keras summary: 24,908 with 1,152 moving statistics).
    """

    input_shape = (1, 49, 10)

    def __init__(self, num_classes: int = 12, filters: int = 64):
        super().__init__()
        layers = [*conv_bn_relu(1, filters, (10, 4), stride=2, padding=(5, 1)), nn.Dropout(0.2)]  # (B,64,25,5)
        for _ in range(4):  # features.4-9, 10-15, 16-21, 22-27
            layers += conv_bn_relu(filters, filters, 3, padding=1, groups=filters)  # depthwise
            layers += conv_bn_relu(filters, filters, 1)  # pointwise
        layers += [nn.Dropout(0.4), nn.AvgPool2d((24, 5)), nn.Flatten()]  # features.28-30: (B,64)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# (output channels, depthwise stride) of MobileNetV1's 13 depthwise-separable layers at alpha = 1; x alpha.
MOBILENET_LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier alpha = 0.25 for Visual Wake Words (visual_wake_words/vww_model.py):
    (B,3,96,96) -> (B,2).

    conv 3x3 stride 2 to 8 channels + BN + ReLU; 13 depthwise-separable layers (depthwise 3x3 + BN + ReLU,
    pointwise 1x1 + BN + ReLU; plain ReLU as the MLPerf model has, not Keras' ReLU6) from 8 to 256 channels,
    stride 2 at layers 2, 4, 6, 12; average pool 3x3 over the final 3x3 map; flatten; dense. 27 convolutions
    (13 depthwise), 27 BatchNorms, 1 dense layer. 216,322 parameters (Keras summary: 221,794 with 5,472
    moving statistics).
    """

    input_shape = (3, 96, 96)

    def __init__(self, num_classes: int = 2, alpha: float = 0.25):
        super().__init__()
        c = int(32 * alpha)
        layers = conv_bn_relu(3, c, 3, stride=2, padding=1)  # features.0-2: (B,8,48,48)
        for width, stride in MOBILENET_LAYERS:  # six modules per layer: features.3-8, 9-14, ..., 75-80
            out = int(width * alpha)
            layers += conv_bn_relu(c, c, 3, stride, padding=1, groups=c)  # depthwise
            layers += conv_bn_relu(c, out, 1)  # pointwise
            c = out
        layers += [nn.AvgPool2d(3), nn.Flatten()]  # features.81-82: (B,256,3,3) -> (B,256)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def trainable_sets(model: nn.Module) -> dict[str, list[str]]:
    """The fine-tuning sets the reference models are measured with, by parameter name: `full` (everything),
    `head` (the classifier only: linear probing) and `bn-bias` (every BatchNorm's affine weight and bias plus
    every bias: the cheapest set that still adapts every layer)."""
    names = [n for n, _ in model.named_parameters()]
    norms = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    return {"full": names, "head": [n for n in names if n.startswith("classifier.")],
            "bn-bias": [n for n in names if n in norms or n.endswith(".bias")]}
