"""Reference models beside LeNet-5 (edge_ft.host.model): MLPerf Tiny's ResNet-8, DS-CNN and MobileNetV1-0.25."""

from edge_ft.host.models.tiny import DSCNN, MobileNetV1, ResNet8

REFERENCE_MODELS = {"resnet8": ResNet8, "ds-cnn": DSCNN, "mobilenet-v1-0.25": MobileNetV1}

__all__ = ["DSCNN", "MobileNetV1", "REFERENCE_MODELS", "ResNet8"]
