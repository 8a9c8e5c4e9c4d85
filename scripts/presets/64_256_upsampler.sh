# ImageNet 64 -> 256 upsampler (class-conditional), SAG.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
# BASE_SAMPLES: an npz of 64x64 samples with labels (classifier_sample.py with the 64x64 preset).
#
#   source scripts/presets/64_256_upsampler.sh
#   mpiexec -n 8 python scripts/super_res_sample.py $SAG_FLAGS $MODEL_FLAGS --model_path $MODEL_PATH --base_samples $BASE_SAMPLES $SAMPLE_FLAGS
SCRIPT=scripts/super_res_sample.py
MODEL_PATH=models/64_256_upsampler.pt
BASE_SAMPLES=64_samples.npz
SAMPLE_FLAGS="--batch_size 4 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 --small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
