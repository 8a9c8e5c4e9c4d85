"""
Train a noised image classifier on ImageNet-style image folders.

    mpiexec -n N python scripts/classifier_train.py --data_dir DIR [--val_data_dir DIR] \
        $CLASSIFIER_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS

guided-diffusion's classifier training: with ``--noised True`` (default) every
batch is diffused to a timestep from ``--schedule_sampler`` with the
diffusion's ``q_sample`` and the classifier sees that timestep, so that it can
guide sampling at every noise level. Class labels come from the file names
(the part before the first ``_``, sorted names numbered 0, 1, ...).

Checkpoints go to ``$OPENAI_LOGDIR``: ``modelNNNNNN.pt`` (the weights after
exactly NNNNNN optimizer steps, a plain state_dict), ``optNNNNNN.pt`` and a
model card ``modelNNNNNN.json`` with the flags the weights need. Resume with
``--resume_checkpoint DIR/modelNNNNNN.pt`` (``optNNNNNN.pt`` next to it is
loaded too); ``--iterations`` counts all steps, resumed ones included.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import blobfile as bf  # noqa: E402
import torch as th  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim import AdamW  # noqa: E402

from improved_diffusion import dist_util, logger  # noqa: E402
from improved_diffusion.files.atomic import atomic_torch_save  # noqa: E402
from improved_diffusion.fp16_util import MixedPrecisionTrainer  # noqa: E402
from improved_diffusion.image_datasets import load_data  # noqa: E402
from improved_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    keyword_defaults,
    write_model_card,
)
from improved_diffusion.train_util import (  # noqa: E402
    StepRateLogger,
    Trainer,
    load_optimizer_state,
    log_loss_dict,
    parse_resume_step_from_filename,
    save_optimizer_state,
    wrap_ddp,
)

# guided-diffusion starts the classifier's loss scale lower than the UNet's.
CLASSIFIER_INITIAL_LG_LOSS_SCALE = 16.0


class ClassifierTrainer(Trainer):
    """
    The loop of guided-diffusion's classifier_train.py, as an object so that
    tests can drive it with in-memory data.

    Step counting as in train_util: ``step`` counts the optimizer steps of this
    run, ``resume_step`` the restored ones; training stops when their sum
    reaches ``iterations``.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        val_data=None,
        use_fp16=False,
        card_flags=None,
        # The defaults of this script's flags (trainer_defaults()).
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler=None,
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
    ):
        """
        :param data: an iterator of (NCHW images in [-1, 1], {"y": labels}).
        :param val_data: the same for validation batches, or None.
        :param batch_size, microbatch: see train_util.Trainer.
        :param noised: diffuse each batch to a sampled timestep first.
        :param schedule_sampler: where the timesteps come from (None: uniform).
        :param anneal_lr: lr decays linearly from `lr` to 0 over `iterations`.
        :param resume_checkpoint: a ``modelNNNNNN.pt`` to resume from, or "".
        :param card_flags: flags written as a model card next to each model
            checkpoint (None: no card).
        """
        super().__init__(model, diffusion, data, batch_size, microbatch)
        self.val_data = val_data
        self.iterations = iterations
        self.lr = lr
        self.anneal_lr = anneal_lr
        self.noised = noised
        self.schedule_sampler = schedule_sampler or create_named_schedule_sampler(
            "uniform", diffusion
        )
        self.log_interval = log_interval
        self.eval_interval = eval_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.card_flags = card_flags

        if resume_checkpoint:
            self._load_model_state()
        # Needed for creating correct EMAs and fp16 parameters.
        dist_util.sync_params(self.model.parameters())

        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=use_fp16,
            initial_lg_loss_scale=CLASSIFIER_INITIAL_LG_LOSS_SCALE,
        )
        self.opt = AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        if self.resume_step:
            self._load_optimizer_state()

        self.ddp_model, self.use_ddp = wrap_ddp(self.model)
        self.speed = StepRateLogger()

    def _load_model_state(self):
        self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint)
        logger.log(f"loading model from checkpoint: {self.resume_checkpoint}... "
                   f"at {self.resume_step} step")
        # Every rank calls load_state_dict: it broadcasts rank 0's bytes.
        self.model.load_state_dict(
            dist_util.load_state_dict(self.resume_checkpoint, map_location=dist_util.dev())
        )

    def _load_optimizer_state(self):
        path = bf.join(bf.dirname(self.resume_checkpoint), f"opt{self.resume_step:06}.pt")
        load_optimizer_state(self.opt, self.mp_trainer, path)

    # ------------------------------------------------------------------

    def global_step(self):
        return self.step + self.resume_step

    def run_loop(self):
        while self.global_step() < self.iterations:
            self.run_step()
            gstep = self.global_step()
            if self.val_data is not None and self.eval_interval > 0 \
                    and gstep % self.eval_interval == 0:
                self.evaluate()
            if gstep % self.log_interval == 0:
                self.speed.log(self.step)
                logger.dumpkvs()
            if gstep % self.save_interval == 0:
                self.save()
        if self.step > 0 and self.global_step() % self.save_interval != 0:
            self.save()

    def run_step(self):
        if self.anneal_lr:
            self._set_annealed_lr(self.global_step() / self.iterations)
        self.forward_backward_log(self.data, prefix="train")
        self.mp_trainer.optimize(self.opt)
        self.step += 1
        logger.logkv("step", self.global_step())
        logger.logkv("samples", self.global_step() * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def evaluate(self):
        was_training = self.model.training
        self.model.eval()
        with th.no_grad():
            self.forward_backward_log(self.val_data, prefix="val")
        self.model.train(was_training)

    def _set_annealed_lr(self, frac_done):
        lr = self.lr * (1 - frac_done)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def forward_backward_log(self, data_loader, prefix="train"):
        """One batch: noise it, classify it, log losses by quartile, backprop."""
        batch, extra = next(data_loader)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        if self.noised:
            t, _ = self.schedule_sampler.sample(batch.shape[0], dist_util.dev())
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = th.zeros(batch.shape[0], dtype=th.long, device=dist_util.dev())

        n = batch.shape[0]
        starts = list(range(0, n, self.microbatch))
        for i, start in enumerate(starts):
            sub_batch = batch[start : start + self.microbatch]
            sub_labels = labels[start : start + self.microbatch]
            sub_t = t[start : start + self.microbatch]
            last = i == len(starts) - 1
            if th.is_grad_enabled() and self.use_ddp and not last:
                with self.ddp_model.no_sync():
                    self._micro_step(sub_batch, sub_labels, sub_t, n, prefix, first=i == 0)
            else:
                self._micro_step(sub_batch, sub_labels, sub_t, n, prefix, first=i == 0)

    def _micro_step(self, sub_batch, sub_labels, sub_t, n, prefix, first):
        logits = self.ddp_model(sub_batch, timesteps=sub_t)
        loss = F.cross_entropy(logits.float(), sub_labels, reduction="none")
        losses = {
            f"{prefix}_loss": loss.detach(),
            f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
        }
        if logits.shape[-1] > 5:
            losses[f"{prefix}_acc@5"] = compute_top_k(logits, sub_labels, k=5, reduction="none")
        log_loss_dict(self.diffusion, sub_t, losses)
        loss = loss.mean()
        if loss.requires_grad:
            if first:
                self.mp_trainer.zero_grad()
            self.mp_trainer.backward(loss * len(sub_batch) / n)

    def save(self):
        """Write modelNNNNNN.pt (+ card) and optNNNNNN.pt on rank 0, then barrier."""
        step = self.global_step()
        if dist_util.is_main_process():
            logdir = logger.get_dir()
            logger.log("saving model...")
            model_path = bf.join(logdir, f"model{step:06d}.pt")
            state = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
            atomic_torch_save(state, model_path)
            save_optimizer_state(self.opt, self.mp_trainer, bf.join(logdir, f"opt{step:06d}.pt"))
            if self.card_flags is not None and "://" not in model_path:
                write_model_card(model_path, self.card_flags, step=step)
        dist_util.barrier()


def compute_top_k(logits, labels, k, reduction="mean"):
    """Top-k accuracy (1.0 where the label is among the k largest logits)."""
    _, top_ks = th.topk(logits, k, dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    if reduction == "mean":
        return hits.mean().item()
    if reduction == "none":
        return hits
    raise ValueError(f"unknown reduction {reduction!r}")


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if not args.data_dir or not os.path.isdir(args.data_dir):
        print(f"error: --data_dir {args.data_dir!r} is not a folder of images",
              file=sys.stderr)
        sys.exit(2)
    if args.val_data_dir and not os.path.isdir(args.val_data_dir):
        print(f"error: --val_data_dir {args.val_data_dir!r} is not a folder of images",
              file=sys.stderr)
        sys.exit(2)

    dist_util.setup_dist()
    logger.configure()

    flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
    if dist_util.is_main_process():
        with open(os.path.join(logger.get_dir(), "model_flags.json"), "w") as f:
            json.dump({"flags": flags}, f, indent=1, sort_keys=True)

    logger.log("creating model and diffusion...")
    model, diffusion = create_classifier_and_diffusion(**flags)
    model.to(dist_util.dev())
    if args.noised:
        schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    else:
        schedule_sampler = None

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=args.random_crop,
    )
    val_data = None
    if args.val_data_dir:
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
        )

    logger.log("training classifier model...")
    settings = args_to_dict(args, trainer_defaults().keys())
    settings["schedule_sampler"] = schedule_sampler
    trainer = ClassifierTrainer(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        use_fp16=args.classifier_use_fp16,
        card_flags=flags,
        **settings,
    )
    trainer.run_loop()
    return trainer


def trainer_defaults():
    """
    ClassifierTrainer's settings that this script takes as flags, with its
    defaults (schedule_sampler by name here, an object there).
    """
    flags = keyword_defaults(ClassifierTrainer, exclude=("val_data", "use_fp16", "card_flags"))
    flags["schedule_sampler"] = "uniform"
    return flags


def create_argparser():
    defaults = dict(data_dir="", val_data_dir="")
    defaults.update(trainer_defaults())
    defaults.update(random_crop=True)
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description="Train a noised image classifier.")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    main()
