# ImageNet 64x64, class-conditional, SAG with classifier guidance.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
# Classifier scale and depth from guided-diffusion's README.
# --use_new_attention_order True: the published map reads qkv in the legacy layout; --sag_true_attention True for the true one.
#
#   source scripts/presets/64x64_diffusion.sh
#   mpiexec -n 8 python scripts/classifier_sample.py $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS
SCRIPT=scripts/classifier_sample.py
MODEL_PATH=models/64x64_diffusion.pt
SAMPLE_FLAGS="--batch_size 32 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 3 --blur_sigma 2 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 1.0 --classifier_path models/64x64_classifier.pt --classifier_depth 4"
