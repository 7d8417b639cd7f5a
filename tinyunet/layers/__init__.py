"""The layers, one small file per family; each backward sits right under its forward."""
from .activation import ReLU, Sigmoid, sigmoid
from .base import Layer, LayerInputError
from .batchnorm import BatchNorm2d
from .concat import Concat
from .conv import Conv2d, conv2d_naive, same_padding
from .convtranspose import ConvTranspose2d, bilinear_weight
from .crop import CenterCrop2d
from .dropout import Dropout
from .fuse import Add, Crop2d
from .pool import CeilMaxPool2d, MaxPool2d
from .unpool import MaxUnpool2d
from .upconv import UpConv2d
from .upsample import Upsample2d

__all__ = ["Layer", "LayerInputError", "Conv2d", "conv2d_naive", "same_padding", "MaxPool2d",
           "Upsample2d", "UpConv2d", "CenterCrop2d", "Concat", "Dropout", "ReLU", "Sigmoid", "sigmoid",
           # FCN and SegNet (issue 15)
           "ConvTranspose2d", "bilinear_weight", "CeilMaxPool2d", "MaxUnpool2d", "BatchNorm2d",
           "Crop2d", "Add"]
