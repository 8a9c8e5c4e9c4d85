# Training flags of the embedded default model (models/fashion32_ema.pt); see models/README.md.
#   source scripts/presets/fashion32_train.sh
#   OPENAI_LOGDIR=logs/fashion32_v3 python scripts/image_train.py --data_dir data/fashion_train \
#       $MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS [--init_checkpoint W.pt | --resume_checkpoint R.pt]
# The recipe flags (warm-ups, cosine decay, in-memory data) are this fork's; --bf16_autocast True
# only where the CPU has native bfloat16 (AVX512-BF16 or AMX), else it trains in float32 anyway.
# The lr schedule plans 9,000 steps; like upstream's script, image_train.py does not stop by
# itself (the lr holds at --lr_final): stop it after the step-9000 save.
# MODEL_FLAGS and DIFFUSION_FLAGS are read from the model card, their one home.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_card() { PYTHONPATH="$_root" "${PYTHON:-python3}" -m improved_diffusion.checkpoints.model_card "$_root/models/$@"; }
MODEL_FLAGS=$(_card fashion32_ema.json image_size num_channels channel_mult num_res_blocks attention_resolutions num_heads class_cond num_classes learn_sigma dropout resblock_updown use_scale_shift_norm norm_groups)
DIFFUSION_FLAGS=$(_card fashion32_ema.json diffusion_steps noise_schedule)
unset -f _card; unset _root
TRAIN_FLAGS="--lr 1e-3 --batch_size 64 --ema_rate 0.9995 --ema_warmup True --lr_warmup_steps 200 --lr_cosine_steps 9000 --lr_final 1e-5 --random_flip False --data_in_memory True --log_interval 50 --save_interval 200"
