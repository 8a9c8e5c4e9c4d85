# Training flags of the embedded default model (models/fashion32_ema.pt); see models/README.md.
#   source scripts/presets/fashion32_train.sh
#   OPENAI_LOGDIR=logs/fashion32_v3 python scripts/image_train.py --data_dir data/fashion_train \
#       $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS [--init_checkpoint W.pt | --resume_checkpoint R.pt]
# The recipe flags (warm-ups, cosine decay, in-memory data) are this fork's; --bf16_autocast True
# only where the CPU has native bfloat16 (AVX512-BF16 or AMX), else it trains in float32 anyway.
# The lr schedule plans 9,000 steps; like upstream's script, image_train.py does not stop by
# itself (the lr holds at --lr_final): stop it after the step-9000 save.
MODEL_FLAGS="--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4 --class_cond True --num_classes 10 --learn_sigma True --dropout 0.1 --resblock_updown False --use_scale_shift_norm True --norm_groups 8"
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine"
TRAIN_FLAGS="--lr 1e-3 --batch_size 64 --ema_rate 0.9995 --ema_warmup True --lr_warmup_steps 200 --lr_cosine_steps 9000 --lr_final 1e-5 --random_flip False --data_in_memory True --log_interval 50 --save_interval 200"
