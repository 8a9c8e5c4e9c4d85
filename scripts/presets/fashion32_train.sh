# Training flags of the embedded default model (models/fashion32_ema.pt).
MODEL_FLAGS="--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4 --class_cond True --num_classes 10 --learn_sigma True --dropout 0.1 --resblock_updown False --use_scale_shift_norm True"
DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule cosine"
TRAIN_FLAGS="--lr 2e-4 --batch_size 64 --ema_rate 0.999 --log_interval 50 --save_interval 250"
