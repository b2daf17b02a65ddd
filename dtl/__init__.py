"""dtl: distributed transfer learning of torchvision backbones on CIFAR-10 and image folders."""

__version__ = "0.1.0"
