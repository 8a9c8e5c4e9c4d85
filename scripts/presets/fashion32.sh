# The embedded default model: class-conditional Fashion-MNIST, 32x32, 10 classes
# (models/fashion32_ema.pt, its noisy classifier models/fashion32_classifier.pt).
# The flags below are also in the model cards models/fashion32_ema.json and
# models/fashion32_classifier.json, so the scripts need none of them:
#   python scripts/image_sample.py                      # = the flags below
#   source scripts/presets/fashion32.sh
#   python scripts/image_sample.py $MODEL_FLAGS $SAG_FLAGS $SAMPLE_FLAGS --model_path models/fashion32_ema.pt
#   python scripts/classifier_sample.py $MODEL_FLAGS $CLASSIFIER_FLAGS $SAG_FLAGS $SAMPLE_FLAGS \
#       --model_path models/fashion32_ema.pt --classifier_path models/fashion32_classifier.pt \
#       --classifier_scale 1.0 --classifier_guidance True
# Training: scripts/presets/fashion32_train.sh and models/README.md.

# Output blocks with attention: 0,1,2 at 8x8 and 3,4,5 at 16x16; input 4,5 (16x16),
# 7,8 (8x8); middle (8x8).
MODEL_FLAGS="--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4 --class_cond True --num_classes 10 --learn_sigma True --dropout 0.1 --resblock_updown False --use_scale_shift_norm True --norm_groups 8 --diffusion_steps 1000 --noise_schedule cosine"
SAG_FLAGS="--guide_scale 0.8 --guide_start 250 --sel_attn_block output --sel_attn_depth 5 --blur_sigma 3.0"
SAMPLE_FLAGS="--timestep_respacing 50 --batch_size 64 --num_samples 256 --use_fp16 True"
CLASSIFIER_FLAGS="--image_size 32 --num_classes 10 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 16,8 --classifier_pool attention --classifier_use_scale_shift_norm True --classifier_resblock_updown True"
