# improved-diffusion CIFAR-10 32x32, unconditional (L_vlb), SAG.
# improved-diffusion (March 2021) flags from its README; it trained with --rescale_timesteps True unless the flags say otherwise.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
#
#   source scripts/presets/cifar10_uncond_vlb_50M_500K.sh
#   mpiexec -n 8 python scripts/image_sample.py $SAG_FLAGS $MODEL_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS
SCRIPT=scripts/image_sample.py
MODEL_PATH=models/cifar10_uncond_vlb_50M_500K.pt
SAMPLE_FLAGS="--batch_size 128 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 --attention_resolutions 16,8 --num_heads 4 --use_scale_shift_norm True --diffusion_steps 4000 --noise_schedule cosine --rescale_timesteps True --use_kl True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 7 --blur_sigma 1 --classifier_guidance False"
