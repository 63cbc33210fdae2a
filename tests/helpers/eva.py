"""The tiny EVA tower of the EVA-weight tests: its sizes, and timm's `Eva` at that size registered
with timm as `_test_eva_tiny` (at import, before EVA_CUSTOM names it), inside an open_clip config.

Shared by tests/models/test_eva_weights.py and tests/models/test_hf_blip2_folder.py.
"""

import timm
from timm.models.eva import Eva

WIDTH, HEADS, FFN, HF_LAYERS, PATCH, SIZE = 64, 4, 256, 3, 14, 28


@timm.models.register_model
def _test_eva_tiny(pretrained=False, **kwargs):  # EVA01-g-14's trunk class at test size, one block to prune
    return timm.models.build_model_with_cfg(  # timm's own builder, as for eva_giant_patch14_224
        Eva, "eva_giant_patch14_224", pretrained=False, feature_cfg={"feature_cls": "getter"},
        patch_size=PATCH, embed_dim=WIDTH, depth=HF_LAYERS + 1, num_heads=HEADS, mlp_ratio=FFN / WIDTH, **kwargs)


# an open_clip config around the tiny Eva trunk (the text tower is never loaded)
EVA_CUSTOM = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "_test_eva_tiny", "timm_pool": "token",
                                              "timm_proj": "linear"},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
