# ImageNet 256x256, unconditional, SAG only (classifier guidance off).
# The seed's flags, verbatim. The seed's text passes --model_path models/256x256_diffusion.pt,
# which is the class-conditional checkpoint and does not load with --class_cond False;
# the unconditional checkpoint is 256x256_diffusion_uncond.pt. The classifier is not loaded
# (--classifier_guidance False), so 256x256_classifier.pt need not be downloaded.
# --num_head_channels 64: the published map splits qkv with --num_heads (default 4), not
# the blocks' real heads; --sag_true_attention True uses the true attention instead.
#
#   source scripts/presets/256x256_diffusion_uncond.sh
#   mpiexec -n 8 python scripts/classifier_sample.py $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS
SCRIPT=scripts/classifier_sample.py
MODEL_PATH=models/256x256_diffusion_uncond.pt
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
CLASSIFIER_FLAGS="--classifier_scale 0.0 --classifier_path models/256x256_classifier.pt"
