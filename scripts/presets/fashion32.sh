# The embedded default model: class-conditional Fashion-MNIST, 32x32, 10 classes
# (models/fashion32_ema.pt, its noisy classifier models/fashion32_classifier.pt).
# The flags' one home is the model cards models/fashion32_ema.json and
# models/fashion32_classifier.json: this preset reads their values from there
# (python3 -m improved_diffusion.checkpoints.model_card, no torch needed), and the
# scripts read the cards themselves, so they need none of them:
#   python scripts/image_sample.py                      # = the flags below
#   source scripts/presets/fashion32.sh
#   python scripts/image_sample.py $MODEL_FLAGS $SAG_FLAGS $SAMPLE_FLAGS --model_path models/fashion32_ema.pt
#   python scripts/classifier_sample.py $MODEL_FLAGS $CLASSIFIER_FLAGS $SAG_FLAGS $SAMPLE_FLAGS \
#       --model_path models/fashion32_ema.pt --classifier_path models/fashion32_classifier.pt \
#       --classifier_scale 0.5 --classifier_guidance True
# (scale 0.5: 2.8 FID better than 1.0 at the same accuracy with the card's sampler;
# models/HISTORY.md.)
# The card samples with SDE-DPM-Solver++ (15 logSNR steps, SAG on each: 30 network
# evaluations per sample); its --timestep_respacing 50 is what --sampler ddpm or
# --use_ddim True take.
# Training: scripts/presets/fashion32_train.sh and models/README.md.

# Output blocks with attention: 0,1,2 at 8x8 and 3,4,5 at 16x16; input 4,5 (16x16),
# 7,8 (8x8); middle (8x8).
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_card() { PYTHONPATH="$_root" "${PYTHON:-python3}" -m improved_diffusion.checkpoints.model_card "$_root/models/$@"; }
MODEL_FLAGS=$(_card fashion32_ema.json image_size num_channels channel_mult num_res_blocks attention_resolutions num_heads class_cond num_classes learn_sigma dropout resblock_updown use_scale_shift_norm norm_groups diffusion_steps noise_schedule)
SAG_FLAGS=$(_card fashion32_ema.json guide_scale guide_start sel_attn_block sel_attn_depth blur_sigma)
SAMPLE_FLAGS=$(_card fashion32_ema.json sampler solver_steps solver_order skip_type batch_size num_samples use_fp16)
CLASSIFIER_FLAGS=$(_card fashion32_classifier.json image_size num_classes classifier_width classifier_depth classifier_attention_resolutions classifier_pool classifier_use_scale_shift_norm classifier_resblock_updown)
unset -f _card; unset _root
