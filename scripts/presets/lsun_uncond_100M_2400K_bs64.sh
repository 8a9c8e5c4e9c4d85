# improved-diffusion LSUN bedroom 256x256 (lr 2e-5), unconditional, SAG.
# improved-diffusion (March 2021) flags from its README; it trained with --rescale_timesteps True unless the flags say otherwise.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
# Attention only at 16x16: output_blocks[5] is the last block with attention.
#
#   source scripts/presets/lsun_uncond_100M_2400K_bs64.sh
#   mpiexec -n 8 python scripts/image_sample.py $SAG_FLAGS $MODEL_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS
SCRIPT=scripts/image_sample.py
MODEL_PATH=models/lsun_uncond_100M_2400K_bs64.pt
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"
SAG_FLAGS="--guide_scale 1.05 --guide_start 250 --sel_attn_block output --sel_attn_depth 5 --blur_sigma 9 --classifier_guidance False"
