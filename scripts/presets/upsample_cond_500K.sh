# improved-diffusion 64 -> 256 upsampler (class-conditional), SAG.
# improved-diffusion (March 2021) flags from its README; it trained with --rescale_timesteps True unless the flags say otherwise.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
# BASE_SAMPLES: an npz of 64x64 samples with labels.
#
#   source scripts/presets/upsample_cond_500K.sh
#   mpiexec -n 8 python scripts/super_res_sample.py $SAG_FLAGS $MODEL_FLAGS --model_path $MODEL_PATH --base_samples $BASE_SAMPLES $SAMPLE_FLAGS
SCRIPT=scripts/super_res_sample.py
MODEL_PATH=models/upsample_cond_500K.pt
BASE_SAMPLES=64_samples.npz
SAMPLE_FLAGS="--batch_size 4 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--large_size 256 --small_size 64 --num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True --attention_resolutions 16,8 --num_heads 4 --use_scale_shift_norm True --diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
