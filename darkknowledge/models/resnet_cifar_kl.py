"""ResNet-18 / ResNet-34 for CIFAR as in kuangliu/pytorch-cifar (He et al., CVPR 2016).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (BasicBlock
ResNets, Table 1), in the CIFAR form of kuangliu/pytorch-cifar ``models/resnet.py``, which the
data-free distillation papers use for CIFAR-10: DAFL (Chen et al., ICCV 2019: ResNet-34
teacher, ResNet-18 student; their ``resnet.py`` is this code) and DFAD (Fang et al., "Data-Free
Adversarial Distillation", 2019).

A 3x3 stride-1 conv-BN-ReLU stem of 64 channels with no max pool, four stages of BasicBlocks
(two 3x3 conv-BN, ReLU after the sum) at 64, 128, 256, 512 channels with 2-2-2-2 (ResNet-18)
or 3-4-6-3 (ResNet-34) blocks and strides 1, 2, 2, 2, a 1x1 conv-BN projection shortcut where
the shape changes, then average pooling and a linear classifier. A 32x32 input leaves the
stages at 32, 16, 8 and 4 pixels: 11,173,962 (ResNet-18) and 21,282,122 (ResNet-34) parameters
for 10 classes.

Differences from kuangliu's code, none of which changes the parameters: the average pool is
adaptive (kuangliu's ``avg_pool2d(out, 4)`` is the same on a 32x32 input; here any size works);
the classifier is ``fc`` (kuangliu: ``linear``) and a block's projection is ``downsample``
(kuangliu: ``shortcut``; an identity shortcut is None, not an empty Sequential), because the
blocks are the zoo's BasicBlocks (``darkknowledge.models.resnet_cifar``); the ReLUs are modules
(``"<block>.relu_out:input"`` is the pre-activation sum); no in-place ops; any number of input
channels; ``forward`` returns logits only (features come from hooks). Weights keep PyTorch's
default init, as in kuangliu's and DAFL's code.

The network is :class:`~darkknowledge.models.resnet_imagenet.ResNetImageNet` with its CIFAR
stem (the stages are the same). Named ``resnet18_cifar`` / ``resnet34_cifar``: ``resnet18`` /
``resnet34`` are the ImageNet nets
(``resnet_imagenet.py``), ``resnet8`` ... ``resnet110`` the 3-stage CRD nets (``resnet_cifar.py``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from darkknowledge.models._registry import register_model
from darkknowledge.models.resnet_imagenet import ResNetImageNet, build_resnet_imagenet

BLOCKS_18 = (2, 2, 2, 2)
BLOCKS_34 = (3, 4, 6, 3)

NumClasses = Annotated[int, Field(ge=1)]


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetImageNet:
    """ResNet-18 for CIFAR (kuangliu; 2-2-2-2 blocks, 11,173,962 params for 10 classes), DAFL's student."""
    return build_resnet_imagenet("resnet18_cifar", BLOCKS_18, num_classes, input_shape, stem="cifar")


@register_model("resnet34_cifar")
def resnet34_cifar(num_classes: NumClasses = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ResNetImageNet:
    """ResNet-34 for CIFAR (kuangliu; 3-4-6-3 blocks, 21,282,122 params for 10 classes), DAFL's teacher."""
    return build_resnet_imagenet("resnet34_cifar", BLOCKS_34, num_classes, input_shape, stem="cifar")
