"""
The diffusion training loop (guided-diffusion's TrainLoop).

Step counting: ``self.step`` counts the optimizer steps taken by this run and
``self.resume_step`` those restored from a checkpoint, so a checkpoint named
``modelNNNNNN.pt`` holds the weights after exactly NNNNNN steps, and resuming
from it continues with step NNNNNN + 1.
"""

import copy
import functools
import math
import os
import time

import blobfile as bf
import numpy as np
import torch as th
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .files.atomic import atomic_torch_save
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler
from .script_util import cpu_supports_bf16, keyword_defaults


class Trainer:
    """
    What the training loops here share: the model, its diffusion and data,
    the split of each batch into microbatches, and the step counters (see
    the module docstring). TrainLoop trains the diffusion model;
    scripts/classifier_train.py's ClassifierTrainer a noisy-image classifier.

    :param batch_size: the per-rank batch size.
    :param microbatch: split each batch into chunks of this size for the
        forward/backward passes (gradients accumulate); <= 0 disables.
    """

    def __init__(self, model, diffusion, data, batch_size, microbatch):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.global_batch = batch_size * dist_util.get_world_size()
        self.step = 0
        self.resume_step = 0


class TrainLoop(Trainer):
    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        schedule_sampler=None,
        # The defaults of scripts/image_train.py's flags (train_loop_defaults()).
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        max_steps=0,
        # Not upstream; each default keeps upstream's behaviour.
        lr_warmup_steps=0,
        lr_cosine_steps=0,
        lr_final=0.0,
        ema_warmup=False,
        bf16_autocast=False,
        init_checkpoint="",
        seed=None,
    ):
        """
        :param data: an iterator of (batch, cond) pairs, as from load_data().
        :param batch_size, microbatch: see Trainer.
        :param ema_rate: a float or a comma-separated string of floats.
        :param resume_checkpoint: path of a ``modelNNNNNN.pt`` to resume from
            (the matching ``optNNNNNN.pt`` and ``ema_<rate>_NNNNNN.pt`` next to
            it are loaded too when present), or "" to start fresh.
        :param lr_anneal_steps: if > 0, anneal the lr linearly to 0 and stop
            after this many (global) steps.
        :param max_steps: if > 0, stop after this many steps of this run.
        :param lr_warmup_steps, lr_cosine_steps, lr_final: see learning_rate().
        :param ema_warmup: if True, see ema_decay(); False keeps upstream's
            constant rates.
        :param bf16_autocast: run forward and backward under bfloat16
            autocast (parameters, optimizer and losses stay float32); for
            CPUs with fast bfloat16 (AVX512-BF16, AMX) and CUDA. Unrelated to
            use_fp16, which keeps upstream's float16 weights and loss scaling.
        :param init_checkpoint: a state dict to start the weights from, as a
            new run (step 0, fresh optimizer, EMA from these weights); for
            continuing a run use resume_checkpoint.
        :param seed: if not None, the global torch and numpy generators are
            reseeded before every step from (seed, rank, step), so a step's
            noise, timesteps and dropout depend only on the step: a run
            resumed from a checkpoint continues exactly as an uninterrupted
            one (with data that also depends only on the step, such as
            load_data(in_memory=True, seed=..., start_batch=...)).
        """
        if lr_anneal_steps and lr_cosine_steps:
            raise ValueError("--lr_anneal_steps and --lr_cosine_steps are two lr schedules; pass one")
        if init_checkpoint and resume_checkpoint:
            raise ValueError("--init_checkpoint starts a new run and --resume_checkpoint continues one; pass one")
        if bf16_autocast and use_fp16:
            raise ValueError("--bf16_autocast and --use_fp16 are two mixed-precision modes; pass one")
        super().__init__(model, diffusion, data, batch_size, microbatch)
        self.lr = lr
        self.ema_rate = (
            [float(ema_rate)]
            if isinstance(ema_rate, (int, float))
            else [float(x) for x in str(ema_rate).split(",") if x.strip()]
        )
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_cosine_steps = lr_cosine_steps
        self.lr_final = lr_final
        self.ema_warmup = ema_warmup
        if bf16_autocast and dist_util.dev().type == "cpu" and not cpu_supports_bf16():
            logger.warn("--bf16_autocast True: this CPU has no native bfloat16 support "
                        "(emulated bfloat16 is many times slower); training in float32")
            bf16_autocast = False
        self.bf16_autocast = bf16_autocast
        self.init_checkpoint = init_checkpoint
        self.seed = seed

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=self.use_fp16,
            fp16_scale_growth=fp16_scale_growth,
        )

        self.opt = AdamW(
            self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay
        )
        if self.resume_step:
            self._load_optimizer_state()
            # Model was resumed, either due to a restart or a checkpoint
            # being specified at the command line.
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [
                copy.deepcopy(self.mp_trainer.master_params) for _ in range(len(self.ema_rate))
            ]

        self.ddp_model, self.use_ddp = wrap_ddp(self.model)
        self.speed = StepRateLogger()

    # ------------------------------------------------------------------
    # Resuming
    # ------------------------------------------------------------------

    def _main_checkpoint(self):
        return find_resume_checkpoint() or self.resume_checkpoint

    def _load_and_sync_parameters(self):
        resume_checkpoint = self._main_checkpoint()
        if self.init_checkpoint and not resume_checkpoint:
            logger.log(f"initialising the weights from {self.init_checkpoint} (a new run: step 0)")
            self.model.load_state_dict(
                dist_util.load_state_dict(self.init_checkpoint, map_location=dist_util.dev())
            )
        if resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(resume_checkpoint)
            logger.log(f"loading model from checkpoint: {resume_checkpoint}...")
            # Every rank calls load_state_dict: it broadcasts rank 0's bytes.
            self.model.load_state_dict(
                dist_util.load_state_dict(resume_checkpoint, map_location=dist_util.dev())
            )
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        ema_checkpoint = find_ema_checkpoint(self._main_checkpoint(), self.resume_step, rate)
        if ema_checkpoint:
            logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
            state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=dist_util.dev())
            ema_params = self.mp_trainer.state_dict_to_master_params(state_dict)
        else:
            logger.warn(f"no EMA checkpoint for rate {rate} at step {self.resume_step}; "
                        "starting the EMA from the model weights")
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        path = bf.join(bf.dirname(self._main_checkpoint()), f"opt{self.resume_step:06}.pt")
        load_optimizer_state(self.opt, self.mp_trainer, path)

    # ------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------

    def _should_continue(self):
        if self.lr_anneal_steps and self.step + self.resume_step >= self.lr_anneal_steps:
            return False
        if self.max_steps and self.step >= self.max_steps:
            return False
        return True

    def run_loop(self):
        while self._should_continue():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            global_step = self.step + self.resume_step
            if global_step % self.log_interval == 0:
                self.speed.log(self.step)
                logger.dumpkvs()
            if global_step % self.save_interval == 0:
                self.save()
                # Run for a finite amount of time in integration tests.
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
        # Save the last checkpoint if it wasn't already saved.
        if self.step > 0 and (self.step + self.resume_step) % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond):
        """One optimizer step (forward/backward over all microbatches)."""
        if self.seed is not None:
            seed_global_rngs(self.seed, dist_util.get_rank(), self.step + self.resume_step)
        self._set_lr()
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
        self.step += 1
        self.log_step()

    def _model_fn(self, x, t, **kwargs):
        """The model as the losses call it: under bfloat16 autocast if asked, float32 out."""
        if not self.bf16_autocast:
            return self.ddp_model(x, t, **kwargs)
        with th.autocast(device_type=x.device.type, dtype=th.bfloat16):
            out = self.ddp_model(x, t, **kwargs)
        return out.float()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {
                k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()
            }
            last_batch = (i + self.microbatch) >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())

            compute_losses = functools.partial(
                self.diffusion.training_losses,
                self._model_fn,
                micro,
                t,
                model_kwargs=micro_cond,
            )

            if last_batch or not self.use_ddp:
                losses = compute_losses()
            else:
                with self.ddp_model.no_sync():
                    losses = compute_losses()

            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())

            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss)

    def _update_ema(self):
        steps_before = self.step + self.resume_step
        for rate, params in zip(self.ema_rate, self.ema_params):
            decay = ema_decay(rate, steps_before) if self.ema_warmup else rate
            update_ema(params, self.mp_trainer.master_params, rate=decay)

    def _set_lr(self):
        """Set the lr of the coming step from the number of steps already taken."""
        lr = learning_rate(
            self.step + self.resume_step,
            self.lr,
            anneal_steps=self.lr_anneal_steps,
            warmup_steps=self.lr_warmup_steps,
            cosine_steps=self.lr_cosine_steps,
            final=self.lr_final,
        )
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr
        logger.logkv("lr", lr)

    def log_step(self):
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step) * self.global_batch)

    # ------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------

    def save(self):
        """Write model, EMA and optimizer checkpoints (rank 0), then barrier."""
        global_step = self.step + self.resume_step
        if dist_util.is_main_process():
            logdir = get_blob_logdir()

            def save_checkpoint(rate, params):
                state_dict = self.mp_trainer.master_params_to_state_dict(params)
                logger.log(f"saving model {rate}...")
                if not rate:
                    filename = f"model{global_step:06d}.pt"
                else:
                    filename = f"ema_{rate}_{global_step:06d}.pt"
                atomic_torch_save(state_dict, bf.join(logdir, filename))

            save_checkpoint(0, self.mp_trainer.master_params)
            for rate, params in zip(self.ema_rate, self.ema_params):
                save_checkpoint(rate, params)
            opt_path = bf.join(logdir, f"opt{global_step:06d}.pt")
            save_optimizer_state(self.opt, self.mp_trainer, opt_path)

        dist_util.barrier()


def train_loop_defaults():
    """
    TrainLoop's settings that scripts/image_train.py takes as flags, with
    TrainLoop's defaults (schedule_sampler and seed, objects here, are flags
    of their own there).
    """
    return keyword_defaults(TrainLoop, exclude=("schedule_sampler", "seed"))


def learning_rate(steps_done, base, anneal_steps=0, warmup_steps=0, cosine_steps=0, final=0.0):
    """
    The lr of the step that follows `steps_done` optimizer steps.

    Upstream (all options 0): `base`, or with `anneal_steps` the linear
    anneal base * (1 - steps_done / anneal_steps). `cosine_steps` > 0 decays
    instead from base to `final` along half a cosine, reaching `final` at
    step `cosine_steps` and holding it. `warmup_steps` > 0 multiplies either
    by min(1, (steps_done + 1) / warmup_steps).
    """
    if anneal_steps:
        lr = base * max(0.0, 1.0 - steps_done / anneal_steps)
    elif cosine_steps:
        frac = min(1.0, steps_done / cosine_steps)
        lr = final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    else:
        lr = base
    if warmup_steps:
        lr *= min(1.0, (steps_done + 1) / warmup_steps)
    return lr


def seed_global_rngs(*keys):
    """Seed torch's and numpy's global generators from a tuple of integers."""
    state = np.random.SeedSequence(list(keys)).generate_state(2)
    th.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))


def ema_decay(rate, steps_before):
    """
    EMA decay with warm-up: min(rate, (1 + n) / (10 + n)) for the update
    after n = `steps_before` optimizer steps, so the average forgets the
    initial weights within the first few hundred steps instead of
    1 / (1 - rate) of them.
    """
    return min(rate, (1.0 + steps_before) / (10.0 + steps_before))


def wrap_ddp(model):
    """
    (model wrapped in DistributedDataParallel, True) when this process is one
    rank of several (device ids on CUDA only), else (model, False).
    """
    if not dist_util.is_distributed():
        return model, False
    device = dist_util.dev()
    device_ids = [device] if device.type == "cuda" else None
    ddp = DDP(
        model,
        device_ids=device_ids,
        output_device=device_ids[0] if device_ids else None,
        broadcast_buffers=False,
        bucket_cap_mb=128,
        find_unused_parameters=False,
    )
    return ddp, True


def load_optimizer_state(opt, mp_trainer, path):
    """
    Load optNNNNNN.pt into `opt` (and the fp16 loss scale that save() adds for
    fp16 runs; absent in upstream files); warn and keep a fresh state when
    the file is missing.
    """
    if not bf.exists(path):
        logger.warn(f"no optimizer checkpoint {path}; fresh optimizer state")
        return
    logger.log(f"loading optimizer state from checkpoint: {path}")
    state_dict = dist_util.load_state_dict(path, map_location=dist_util.dev())
    lg_loss_scale = state_dict.pop("lg_loss_scale", None)
    if mp_trainer.use_fp16 and lg_loss_scale is not None:
        mp_trainer.lg_loss_scale = float(lg_loss_scale)
    opt.load_state_dict(state_dict)


def save_optimizer_state(opt, mp_trainer, path):
    """Write `opt`'s state to optNNNNNN `path`, with the loss scale of fp16 runs."""
    state_dict = opt.state_dict()
    if mp_trainer.use_fp16:
        state_dict["lg_loss_scale"] = float(mp_trainer.lg_loss_scale)
    atomic_torch_save(state_dict, path)


class StepRateLogger:
    """Logs steps_per_sec over the steps since its previous log."""

    def __init__(self):
        self.time, self.step = time.time(), 0

    def log(self, step):
        now = time.time()
        steps = step - self.step
        if steps > 0 and now > self.time:
            logger.logkv("steps_per_sec", steps / (now - self.time))
        self.time, self.step = now, step


def parse_resume_step_from_filename(filename):
    """
    Parse filenames of the form path/to/modelNNNNNN.pt, where NNNNNN is the
    checkpoint's number of steps.
    """
    split = bf.basename(filename).split("model")
    if len(split) < 2:
        return 0
    split1 = split[-1].split(".")[0]
    try:
        return int(split1)
    except ValueError:
        return 0


def get_blob_logdir():
    # You can change this to be a separate path to save checkpoints to
    # a blobstore or some external drive.
    return logger.get_dir()


def find_resume_checkpoint():
    # On your infrastructure, you may want to override this to automatically
    # discover the latest checkpoint on your blob storage, etc.
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    if not main_checkpoint:
        return None
    filename = f"ema_{rate}_{(step):06d}.pt"
    path = bf.join(bf.dirname(main_checkpoint), filename)
    if bf.exists(path):
        return path
    return None


def log_loss_dict(diffusion, ts, losses):
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        # Log the quantiles (four quartiles, in particular).
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
