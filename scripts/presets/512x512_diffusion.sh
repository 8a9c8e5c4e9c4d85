# ImageNet 512x512, class-conditional, SAG with classifier guidance.
# SAG settings chosen by analogy with the seed's (not from the paper): tune --guide_scale first.
# Classifier scale and --use_fp16 False from guided-diffusion's README.
#
#   source scripts/presets/512x512_diffusion.sh
#   mpiexec -n 8 python scripts/classifier_sample.py $SAG_FLAGS $MODEL_FLAGS $CLASSIFIER_FLAGS --model_path $MODEL_PATH $SAMPLE_FLAGS
SCRIPT=scripts/classifier_sample.py
MODEL_PATH=models/512x512_diffusion.pt
SAMPLE_FLAGS="--batch_size 4 --num_samples 10000 --timestep_respacing 250"
MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 4.0 --classifier_path models/512x512_classifier.pt"
