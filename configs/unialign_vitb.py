"""UniAlign at the paper's scale (§3.3, §4.1): frozen CLIP ViT-B/16 vision tower, 6 modalities.

    python configs/unialign_vitb.py      # trainable parameter count by module group, from shapes only
    python -m unialign_jax.train --config=configs/unialign_vitb.py:weights=/ckpt/clip_vit_b16.safetensors,anchors=/data/class_text.npz \
        --workdir=workdirs/unialign_vitb

Modalities: text is the anchor (the frozen CLIP text tower's embeddings, supplied as files); image,
video, audio, depth and point clouds go through the ONE frozen ViT-B/16 (weights from `weights=`, an
OpenAI / OpenCLIP / Hugging Face state dict, QuickGELU) with their own tokenizers (ViT-Lens sizes:
image 224² patches 16 (CLIP's, frozen); video 8 x 224² per-frame patches + temporal embedding; audio
AST 16x16 stride 10 on 128 mel x 512 frames = 600 tokens; depth 224² one-channel patches; points
PointBERT, 8192 points, 512 groups of 32) and modality-aware MoE-LoRA experts: 2 per modality, top-2,
r = 4, alpha = 32 (Table 9's choice), grouped routing (Table 8). AdamW lr 2e-4, weight decay 0.05,
2048 examples per update by accumulation (8 micro-batches per modality of 52 + 4 x 51), 100 epochs of
`epoch_examples` (default: ImageNet-1K's 1,281,167; smaller datasets repeat, as the paper's repeated
augmentation). Model distillation from cached teacher features (ONE-PEACE for video and audio,
ViT-Lens for depth, ULIP for points; feature sizes in `teachers.dims`), never trained here.

What a real run needs besides this file, none of which ships with the project: the CLIP weights
(`weights=`), the class-label embeddings of each dataset from CLIP's text tower as an .npz with one
[C, 512] array per modality (`anchors=`), converted datasets (data source `features`, names below;
their per-example layouts must be the raw inputs of `model.input_shapes`), and the teachers'
features in `<workdir>/teachers/<modality>.npz` (`unialign_jax.methods.unialign.teachers` describes the format; their
widths differ from CLIP's 512, so each file also holds `anchor_features`, the teacher's own embedding
of every example's anchor view).
Ablations as in configs/unialign_digits.py (`routing=`, `experts=`, `top_k=`, `soft_bind=`,
`anchor_distil=`, `model_distil=`); `placement=ffn_linears|parallel` places the LoRA experts on the
FFN's two linears (LoRAMoE) or beside the FFN (Eq. 7).
"""

import ml_collections

from unialign_jax.methods.unialign import config as unialign_config

MODALITIES = ("image", "video", "audio", "depth", "points", "text")
ENCODED = ("image", "video", "audio", "depth", "points")
SHAPES = {
    "image": (224, 224, 3),
    "video": (8, 224, 224, 3),
    "audio": (512, 128),
    "depth": (224, 224, 1),
    "points": (8192, 3),
    "text": (1, 512),  # per example, one frozen CLIP embedding of its anchor view (caption or rendered image)
}
TOKENIZERS = {
    "image": dict(kind="image", patch_size=16),
    "video": dict(kind="video", patch_size=16, num_frames=8),
    "audio": dict(kind="audio", patch_size=16, stride=10),
    "depth": dict(kind="depth", patch_size=16),
    "points": dict(kind="points", num_groups=512, group_size=32, encoder_dim=256),
}
DATASETS = {  # converted with `python -m unialign_jax.data.convert --name=...`
    "image": "imagenet1k",
    "video": "audioset_video",
    "audio": "audioset_audio",
    "depth": "sun_rgbd_depth",
    "points": "shapenet_ulip",
}
TEACHER_DIMS = {"video": 1536, "audio": 1536, "depth": 768, "points": 512}  # ONE-PEACE, ViT-Lens-L, ULIP
CLIP_VIT_B16 = dict(width=768, depth=12, num_heads=12, mlp_dim=3072, norm_position="pre", activation="quick_gelu",
                    layer_norm_epsilon=1e-5)
BATCH_SIZE = 2048
ACCUMULATION_STEPS = 8
MICRO_BATCH_SIZES = {"image": 52, "video": 51, "audio": 51, "depth": 51, "points": 51}  # 8 x 256 = 2048


def get_config(arg=None):
    arg = unialign_config.parse_ablation_arg(
        arg, weights="", anchors="", placement="ffn_linears", epochs=100, epoch_examples=1_281_167
    )
    config = unialign_config.base_config(arg)
    config.model.modalities = MODALITIES
    config.model.input_shapes = dict(SHAPES)
    config.model.backbone = "clip"
    config.model.backbone_weights = arg.weights
    config.model.transformer = dict(CLIP_VIT_B16)
    config.model.clip_output_dim = 512
    config.model.embed_dim = 512
    config.model.modality_heads = False  # the paper trains MoE-LoRA and distillation heads; CLIP's projection is shared
    config.model.tokenizers = {m: dict(options) for m, options in TOKENIZERS.items()}
    config.model.adapter.placement = arg.placement
    config.model.scan_layers = True
    config.model.remat = True
    config.model.dtype = "bfloat16"
    config.frozen_patterns = list(unialign_config.FROZEN_BACKBONE) + [r"^tokenizer_image/"]  # CLIP's patch embedding
    config.accumulation = dict(steps=ACCUMULATION_STEPS, micro_batch_sizes=dict(MICRO_BATCH_SIZES))
    config.batch_size = BATCH_SIZE
    config.optim.warmup_steps = 2000
    config.checkpoint.every = 2000
    config.log_every = 100
    config.loss.nce_anchor = "label"  # class-label datasets (ImageNet, ShapeNet, SUN-D, AudioSet)
    config.anchors.source = "file"
    config.anchors.file = arg.anchors
    config.teachers.modalities = tuple(TEACHER_DIMS)
    config.teachers.dims = dict(TEACHER_DIMS)
    config.teachers.auto_train = False
    datasets = {m: ml_collections.ConfigDict(dict(name="features", data_dir=None, dataset=DATASETS[m])) for m in ENCODED}
    steps = arg.steps or arg.epochs * arg.epoch_examples // BATCH_SIZE
    config.stages = [unialign_config.unialign_stage("unialign", MODALITIES, datasets, steps=steps)]
    config.eval.data = dict(datasets)
    return config


if __name__ == "__main__":
    from unialign_jax.methods.unialign import model  # pylint: disable=import-outside-toplevel

    print(model.parameter_table(get_config()))
