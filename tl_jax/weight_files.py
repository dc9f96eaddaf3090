"""torchvision's classification weight files, per arch and weight enum name, with the eval
preprocessing each was validated with (its `weights.transforms()`: Resize(resize_size,
interpolation), CenterCrop(crop_size), ToTensor, Normalize(mean, std)).

The table is torchvision 0.29's registry written out, so tl_jax needs no torch to resolve a name;
tests/test_weight_files.py rebuilds it from torchvision and demands equality.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class WeightFile:
  filename: str                    # under https://download.pytorch.org/models/, SHA-256 prefix in the name
  resize_size: int
  crop_size: int
  interpolation: str               # 'bilinear' | 'bicubic'
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  image_size: Optional[int] = None   # ViTs: the input size the weights fix (position embeddings)


# arch -> weight enum name -> file.
WEIGHT_FILES: dict[str, dict[str, WeightFile]] = {
    'alexnet': {
        'IMAGENET1K_V1': WeightFile('alexnet-owt-7be5be79.pth', 256, 224, 'bilinear'),
    },
    'convnext_base': {
        'IMAGENET1K_V1': WeightFile('convnext_base-6075fbad.pth', 232, 224, 'bilinear'),
    },
    'convnext_large': {
        'IMAGENET1K_V1': WeightFile('convnext_large-ea097f82.pth', 232, 224, 'bilinear'),
    },
    'convnext_small': {
        'IMAGENET1K_V1': WeightFile('convnext_small-0c510722.pth', 230, 224, 'bilinear'),
    },
    'convnext_tiny': {
        'IMAGENET1K_V1': WeightFile('convnext_tiny-983f1562.pth', 236, 224, 'bilinear'),
    },
    'densenet121': {
        'IMAGENET1K_V1': WeightFile('densenet121-a639ec97.pth', 256, 224, 'bilinear'),
    },
    'densenet161': {
        'IMAGENET1K_V1': WeightFile('densenet161-8d451a50.pth', 256, 224, 'bilinear'),
    },
    'densenet169': {
        'IMAGENET1K_V1': WeightFile('densenet169-b2777c0a.pth', 256, 224, 'bilinear'),
    },
    'densenet201': {
        'IMAGENET1K_V1': WeightFile('densenet201-c1103571.pth', 256, 224, 'bilinear'),
    },
    'efficientnet_b0': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b0_rwightman-7f5810bc.pth', 256, 224, 'bicubic'),
    },
    'efficientnet_b1': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b1_rwightman-bac287d4.pth', 256, 240, 'bicubic'),
        'IMAGENET1K_V2': WeightFile('efficientnet_b1-c27df63c.pth', 255, 240, 'bilinear'),
    },
    'efficientnet_b2': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b2_rwightman-c35c1473.pth', 288, 288, 'bicubic'),
    },
    'efficientnet_b3': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b3_rwightman-b3899882.pth', 320, 300, 'bicubic'),
    },
    'efficientnet_b4': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b4_rwightman-23ab8bcd.pth', 384, 380, 'bicubic'),
    },
    'efficientnet_b5': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b5_lukemelas-1a07897c.pth', 456, 456, 'bicubic'),
    },
    'efficientnet_b6': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b6_lukemelas-24a108a5.pth', 528, 528, 'bicubic'),
    },
    'efficientnet_b7': {
        'IMAGENET1K_V1': WeightFile('efficientnet_b7_lukemelas-c5b4e57e.pth', 600, 600, 'bicubic'),
    },
    'efficientnet_v2_l': {
        'IMAGENET1K_V1': WeightFile('efficientnet_v2_l-59c71312.pth', 480, 480, 'bicubic', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    },
    'efficientnet_v2_m': {
        'IMAGENET1K_V1': WeightFile('efficientnet_v2_m-dc08266a.pth', 480, 480, 'bilinear'),
    },
    'efficientnet_v2_s': {
        'IMAGENET1K_V1': WeightFile('efficientnet_v2_s-dd5fe13b.pth', 384, 384, 'bilinear'),
    },
    'googlenet': {
        'IMAGENET1K_V1': WeightFile('googlenet-1378be20.pth', 256, 224, 'bilinear'),
    },
    'inception_v3': {
        'IMAGENET1K_V1': WeightFile('inception_v3_google-0cc3c7bd.pth', 342, 299, 'bilinear'),
    },
    'maxvit_t': {
        'IMAGENET1K_V1': WeightFile('maxvit_t-bc5ab103.pth', 224, 224, 'bicubic'),
    },
    'mnasnet0_5': {
        'IMAGENET1K_V1': WeightFile('mnasnet0.5_top1_67.823-3ffadce67e.pth', 256, 224, 'bilinear'),
    },
    'mnasnet0_75': {
        'IMAGENET1K_V1': WeightFile('mnasnet0_75-7090bc5f.pth', 232, 224, 'bilinear'),
    },
    'mnasnet1_0': {
        'IMAGENET1K_V1': WeightFile('mnasnet1.0_top1_73.512-f206786ef8.pth', 256, 224, 'bilinear'),
    },
    'mnasnet1_3': {
        'IMAGENET1K_V1': WeightFile('mnasnet1_3-a4c69d6f.pth', 232, 224, 'bilinear'),
    },
    'mobilenet_v2': {
        'IMAGENET1K_V1': WeightFile('mobilenet_v2-b0353104.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('mobilenet_v2-7ebf99e0.pth', 232, 224, 'bilinear'),
    },
    'mobilenet_v3_large': {
        'IMAGENET1K_V1': WeightFile('mobilenet_v3_large-8738ca79.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('mobilenet_v3_large-5c1a4163.pth', 232, 224, 'bilinear'),
    },
    'mobilenet_v3_small': {
        'IMAGENET1K_V1': WeightFile('mobilenet_v3_small-047dcff4.pth', 256, 224, 'bilinear'),
    },
    'regnet_x_16gf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_16gf-2007eb11.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_16gf-ba3796d7.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_1_6gf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_1_6gf-e3633e7f.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_1_6gf-a12f2b72.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_32gf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_32gf-9d47f8d0.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_32gf-6eb8fdc6.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_3_2gf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_3_2gf-f342aeae.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_3_2gf-7071aa85.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_400mf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_400mf-adf1edd5.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_400mf-62229a5f.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_800mf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_800mf-ad17e45c.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_800mf-94a99ebd.pth', 232, 224, 'bilinear'),
    },
    'regnet_x_8gf': {
        'IMAGENET1K_V1': WeightFile('regnet_x_8gf-03ceed89.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_x_8gf-2b70d774.pth', 232, 224, 'bilinear'),
    },
    'regnet_y_128gf': {
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('regnet_y_128gf_swag-c8ce3e52.pth', 384, 384, 'bicubic'),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('regnet_y_128gf_lc_swag-cbe8ce12.pth', 224, 224, 'bicubic'),
    },
    'regnet_y_16gf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_16gf-9e6ed7dd.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_16gf-3e4a00f9.pth', 232, 224, 'bilinear'),
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('regnet_y_16gf_swag-43afe44d.pth', 384, 384, 'bicubic'),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('regnet_y_16gf_lc_swag-f3ec0043.pth', 224, 224, 'bicubic'),
    },
    'regnet_y_1_6gf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_1_6gf-b11a554e.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_1_6gf-0d7bc02a.pth', 232, 224, 'bilinear'),
    },
    'regnet_y_32gf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_32gf-4dee3f7a.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_32gf-8db6d4b5.pth', 232, 224, 'bilinear'),
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('regnet_y_32gf_swag-04fdfa75.pth', 384, 384, 'bicubic'),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('regnet_y_32gf_lc_swag-e1583746.pth', 224, 224, 'bicubic'),
    },
    'regnet_y_3_2gf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_3_2gf-b5a9779c.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_3_2gf-9180c971.pth', 232, 224, 'bilinear'),
    },
    'regnet_y_400mf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_400mf-c65dace8.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_400mf-e6988f5f.pth', 232, 224, 'bilinear'),
    },
    'regnet_y_800mf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_800mf-1b27b58c.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_800mf-58fc7688.pth', 232, 224, 'bilinear'),
    },
    'regnet_y_8gf': {
        'IMAGENET1K_V1': WeightFile('regnet_y_8gf-d0d0e4a8.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('regnet_y_8gf-dc2b1b54.pth', 232, 224, 'bilinear'),
    },
    'resnet101': {
        'IMAGENET1K_V1': WeightFile('resnet101-63fe2227.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('resnet101-cd907fc2.pth', 232, 224, 'bilinear'),
    },
    'resnet152': {
        'IMAGENET1K_V1': WeightFile('resnet152-394f9c45.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('resnet152-f82ba261.pth', 232, 224, 'bilinear'),
    },
    'resnet18': {
        'IMAGENET1K_V1': WeightFile('resnet18-f37072fd.pth', 256, 224, 'bilinear'),
    },
    'resnet34': {
        'IMAGENET1K_V1': WeightFile('resnet34-b627a593.pth', 256, 224, 'bilinear'),
    },
    'resnet50': {
        'IMAGENET1K_V1': WeightFile('resnet50-0676ba61.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('resnet50-11ad3fa6.pth', 232, 224, 'bilinear'),
    },
    'resnext101_32x8d': {
        'IMAGENET1K_V1': WeightFile('resnext101_32x8d-8ba56ff5.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('resnext101_32x8d-110c445d.pth', 232, 224, 'bilinear'),
    },
    'resnext101_64x4d': {
        'IMAGENET1K_V1': WeightFile('resnext101_64x4d-173b62eb.pth', 232, 224, 'bilinear'),
    },
    'resnext50_32x4d': {
        'IMAGENET1K_V1': WeightFile('resnext50_32x4d-7cdf4587.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('resnext50_32x4d-1a0047aa.pth', 232, 224, 'bilinear'),
    },
    'shufflenet_v2_x0_5': {
        'IMAGENET1K_V1': WeightFile('shufflenetv2_x0.5-f707e7126e.pth', 256, 224, 'bilinear'),
    },
    'shufflenet_v2_x1_0': {
        'IMAGENET1K_V1': WeightFile('shufflenetv2_x1-5666bf0f80.pth', 256, 224, 'bilinear'),
    },
    'shufflenet_v2_x1_5': {
        'IMAGENET1K_V1': WeightFile('shufflenetv2_x1_5-3c479a10.pth', 232, 224, 'bilinear'),
    },
    'shufflenet_v2_x2_0': {
        'IMAGENET1K_V1': WeightFile('shufflenetv2_x2_0-8be3c8ee.pth', 232, 224, 'bilinear'),
    },
    'squeezenet1_0': {
        'IMAGENET1K_V1': WeightFile('squeezenet1_0-b66bff10.pth', 256, 224, 'bilinear'),
    },
    'squeezenet1_1': {
        'IMAGENET1K_V1': WeightFile('squeezenet1_1-b8a52dc0.pth', 256, 224, 'bilinear'),
    },
    'swin_b': {
        'IMAGENET1K_V1': WeightFile('swin_b-68c6b09e.pth', 238, 224, 'bicubic'),
    },
    'swin_s': {
        'IMAGENET1K_V1': WeightFile('swin_s-5e29d889.pth', 246, 224, 'bicubic'),
    },
    'swin_t': {
        'IMAGENET1K_V1': WeightFile('swin_t-704ceda3.pth', 232, 224, 'bicubic'),
    },
    'swin_v2_b': {
        'IMAGENET1K_V1': WeightFile('swin_v2_b-781e5279.pth', 272, 256, 'bicubic'),
    },
    'swin_v2_s': {
        'IMAGENET1K_V1': WeightFile('swin_v2_s-637d8ceb.pth', 260, 256, 'bicubic'),
    },
    'swin_v2_t': {
        'IMAGENET1K_V1': WeightFile('swin_v2_t-b137f0e2.pth', 260, 256, 'bicubic'),
    },
    'vgg11': {
        'IMAGENET1K_V1': WeightFile('vgg11-8a719046.pth', 256, 224, 'bilinear'),
    },
    'vgg11_bn': {
        'IMAGENET1K_V1': WeightFile('vgg11_bn-6002323d.pth', 256, 224, 'bilinear'),
    },
    'vgg13': {
        'IMAGENET1K_V1': WeightFile('vgg13-19584684.pth', 256, 224, 'bilinear'),
    },
    'vgg13_bn': {
        'IMAGENET1K_V1': WeightFile('vgg13_bn-abd245e5.pth', 256, 224, 'bilinear'),
    },
    'vgg16': {
        'IMAGENET1K_V1': WeightFile('vgg16-397923af.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_FEATURES': WeightFile('vgg16_features-amdegroot-88682ab5.pth', 256, 224, 'bilinear', mean=(0.48235, 0.45882, 0.40784), std=(0.00392156862745098, 0.00392156862745098, 0.00392156862745098)),
    },
    'vgg16_bn': {
        'IMAGENET1K_V1': WeightFile('vgg16_bn-6c64b313.pth', 256, 224, 'bilinear'),
    },
    'vgg19': {
        'IMAGENET1K_V1': WeightFile('vgg19-dcbb9e9d.pth', 256, 224, 'bilinear'),
    },
    'vgg19_bn': {
        'IMAGENET1K_V1': WeightFile('vgg19_bn-c79401a0.pth', 256, 224, 'bilinear'),
    },
    'vit_b_16': {
        'IMAGENET1K_V1': WeightFile('vit_b_16-c867db91.pth', 256, 224, 'bilinear', image_size=224),
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('vit_b_16_swag-9ac1b537.pth', 384, 384, 'bicubic', image_size=384),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('vit_b_16_lc_swag-4e70ced5.pth', 224, 224, 'bicubic', image_size=224),
    },
    'vit_b_32': {
        'IMAGENET1K_V1': WeightFile('vit_b_32-d86f8d99.pth', 256, 224, 'bilinear', image_size=224),
    },
    'vit_h_14': {
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('vit_h_14_swag-80465313.pth', 518, 518, 'bicubic', image_size=518),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('vit_h_14_lc_swag-c1eb923e.pth', 224, 224, 'bicubic', image_size=224),
    },
    'vit_l_16': {
        'IMAGENET1K_V1': WeightFile('vit_l_16-852ce7e3.pth', 242, 224, 'bilinear', image_size=224),
        'IMAGENET1K_SWAG_E2E_V1': WeightFile('vit_l_16_swag-4f3808c9.pth', 512, 512, 'bicubic', image_size=512),
        'IMAGENET1K_SWAG_LINEAR_V1': WeightFile('vit_l_16_lc_swag-4d563306.pth', 224, 224, 'bicubic', image_size=224),
    },
    'vit_l_32': {
        'IMAGENET1K_V1': WeightFile('vit_l_32-c7638314.pth', 256, 224, 'bilinear', image_size=224),
    },
    'wide_resnet101_2': {
        'IMAGENET1K_V1': WeightFile('wide_resnet101_2-32ee1156.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('wide_resnet101_2-d733dc28.pth', 232, 224, 'bilinear'),
    },
    'wide_resnet50_2': {
        'IMAGENET1K_V1': WeightFile('wide_resnet50_2-95faca4d.pth', 256, 224, 'bilinear'),
        'IMAGENET1K_V2': WeightFile('wide_resnet50_2-9ba9bcbe.pth', 232, 224, 'bilinear'),
    },
}

# torchvision's DEFAULT weights per arch.
DEFAULT_WEIGHTS: dict[str, str] = {
    'alexnet': 'IMAGENET1K_V1',
    'convnext_base': 'IMAGENET1K_V1',
    'convnext_large': 'IMAGENET1K_V1',
    'convnext_small': 'IMAGENET1K_V1',
    'convnext_tiny': 'IMAGENET1K_V1',
    'densenet121': 'IMAGENET1K_V1',
    'densenet161': 'IMAGENET1K_V1',
    'densenet169': 'IMAGENET1K_V1',
    'densenet201': 'IMAGENET1K_V1',
    'efficientnet_b0': 'IMAGENET1K_V1',
    'efficientnet_b1': 'IMAGENET1K_V2',
    'efficientnet_b2': 'IMAGENET1K_V1',
    'efficientnet_b3': 'IMAGENET1K_V1',
    'efficientnet_b4': 'IMAGENET1K_V1',
    'efficientnet_b5': 'IMAGENET1K_V1',
    'efficientnet_b6': 'IMAGENET1K_V1',
    'efficientnet_b7': 'IMAGENET1K_V1',
    'efficientnet_v2_l': 'IMAGENET1K_V1',
    'efficientnet_v2_m': 'IMAGENET1K_V1',
    'efficientnet_v2_s': 'IMAGENET1K_V1',
    'googlenet': 'IMAGENET1K_V1',
    'inception_v3': 'IMAGENET1K_V1',
    'maxvit_t': 'IMAGENET1K_V1',
    'mnasnet0_5': 'IMAGENET1K_V1',
    'mnasnet0_75': 'IMAGENET1K_V1',
    'mnasnet1_0': 'IMAGENET1K_V1',
    'mnasnet1_3': 'IMAGENET1K_V1',
    'mobilenet_v2': 'IMAGENET1K_V2',
    'mobilenet_v3_large': 'IMAGENET1K_V2',
    'mobilenet_v3_small': 'IMAGENET1K_V1',
    'regnet_x_16gf': 'IMAGENET1K_V2',
    'regnet_x_1_6gf': 'IMAGENET1K_V2',
    'regnet_x_32gf': 'IMAGENET1K_V2',
    'regnet_x_3_2gf': 'IMAGENET1K_V2',
    'regnet_x_400mf': 'IMAGENET1K_V2',
    'regnet_x_800mf': 'IMAGENET1K_V2',
    'regnet_x_8gf': 'IMAGENET1K_V2',
    'regnet_y_128gf': 'IMAGENET1K_SWAG_E2E_V1',
    'regnet_y_16gf': 'IMAGENET1K_V2',
    'regnet_y_1_6gf': 'IMAGENET1K_V2',
    'regnet_y_32gf': 'IMAGENET1K_V2',
    'regnet_y_3_2gf': 'IMAGENET1K_V2',
    'regnet_y_400mf': 'IMAGENET1K_V2',
    'regnet_y_800mf': 'IMAGENET1K_V2',
    'regnet_y_8gf': 'IMAGENET1K_V2',
    'resnet101': 'IMAGENET1K_V2',
    'resnet152': 'IMAGENET1K_V2',
    'resnet18': 'IMAGENET1K_V1',
    'resnet34': 'IMAGENET1K_V1',
    'resnet50': 'IMAGENET1K_V2',
    'resnext101_32x8d': 'IMAGENET1K_V2',
    'resnext101_64x4d': 'IMAGENET1K_V1',
    'resnext50_32x4d': 'IMAGENET1K_V2',
    'shufflenet_v2_x0_5': 'IMAGENET1K_V1',
    'shufflenet_v2_x1_0': 'IMAGENET1K_V1',
    'shufflenet_v2_x1_5': 'IMAGENET1K_V1',
    'shufflenet_v2_x2_0': 'IMAGENET1K_V1',
    'squeezenet1_0': 'IMAGENET1K_V1',
    'squeezenet1_1': 'IMAGENET1K_V1',
    'swin_b': 'IMAGENET1K_V1',
    'swin_s': 'IMAGENET1K_V1',
    'swin_t': 'IMAGENET1K_V1',
    'swin_v2_b': 'IMAGENET1K_V1',
    'swin_v2_s': 'IMAGENET1K_V1',
    'swin_v2_t': 'IMAGENET1K_V1',
    'vgg11': 'IMAGENET1K_V1',
    'vgg11_bn': 'IMAGENET1K_V1',
    'vgg13': 'IMAGENET1K_V1',
    'vgg13_bn': 'IMAGENET1K_V1',
    'vgg16': 'IMAGENET1K_V1',
    'vgg16_bn': 'IMAGENET1K_V1',
    'vgg19': 'IMAGENET1K_V1',
    'vgg19_bn': 'IMAGENET1K_V1',
    'vit_b_16': 'IMAGENET1K_V1',
    'vit_b_32': 'IMAGENET1K_V1',
    'vit_h_14': 'IMAGENET1K_SWAG_E2E_V1',
    'vit_l_16': 'IMAGENET1K_V1',
    'vit_l_32': 'IMAGENET1K_V1',
    'wide_resnet101_2': 'IMAGENET1K_V2',
    'wide_resnet50_2': 'IMAGENET1K_V2',
}


def imagenet_weights_name(arch: str) -> str:
  """The enum `weights: imagenet` names: IMAGENET1K_V1 (the tutorial's `pretrained=True`) where
  torchvision has it, else its DEFAULT (the SWAG-only ViT-H and RegNet-Y-128GF)."""
  return 'IMAGENET1K_V1' if 'IMAGENET1K_V1' in WEIGHT_FILES[arch] else DEFAULT_WEIGHTS[arch]
