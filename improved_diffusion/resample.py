"""
Timestep samplers for diffusion training (importance sampling over t).
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """
    Create a ScheduleSampler from a library of pre-defined samplers.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion object to sample for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    elif name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    else:
        raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    """
    A distribution over timesteps in the diffusion process, intended to reduce
    variance of the objective.

    By default, samplers perform unbiased importance sampling, in which the
    objective's mean is unchanged.  Subclasses may override sample() to change
    how the resampled terms are reweighted.
    """

    @abstractmethod
    def weights(self):
        """
        A numpy array of weights, one per diffusion step.

        The weights needn't be normalized, but must be positive.
        """

    def sample(self, batch_size, device):
        """
        Importance-sample timesteps for a batch.

        :param batch_size: the number of timesteps.
        :param device: the torch device to put them on.
        :return: (timesteps, weights): a long tensor of timestep indices and a
                 float tensor of weights to scale the resulting losses.
        """
        w = np.asarray(self.weights(), dtype=np.float64)
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the reweighting using losses from a model.

        Call this method from each rank with a batch of timesteps and the
        corresponding losses.  When a torch.distributed process group of more
        than one rank exists, the losses of all ranks are gathered so that all
        ranks keep the exact same reweighting; otherwise the local losses are
        used directly.

        :param local_ts: an integer Tensor of timesteps.
        :param local_losses: a 1D Tensor of losses.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self.update_with_all_losses(
                [int(x) for x in local_ts.tolist()],
                [float(x) for x in local_losses.tolist()],
            )
            return

        world_size = dist.get_world_size()
        device = local_ts.device
        batch_sizes = [th.zeros(1, dtype=th.int64, device=device) for _ in range(world_size)]
        dist.all_gather(batch_sizes, th.tensor([len(local_ts)], dtype=th.int64, device=device))
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)

        # all_gather needs equally-sized tensors: pad to the largest batch.
        def padded(x, dtype):
            out = th.zeros(max_bs, dtype=dtype, device=device)
            out[: len(x)] = x.to(dtype)
            return out

        local_ts_p = padded(local_ts, th.int64)
        local_losses_p = padded(local_losses.detach(), th.float64)
        timestep_batches = [th.zeros_like(local_ts_p) for _ in batch_sizes]
        loss_batches = [th.zeros_like(local_losses_p) for _ in batch_sizes]
        dist.all_gather(timestep_batches, local_ts_p)
        dist.all_gather(loss_batches, local_losses_p)
        timesteps = [
            int(x) for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs].tolist()
        ]
        losses = [
            float(x) for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs].tolist()
        ]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the reweighting using losses from a model.

        Called by update_with_local_losses from all ranks with identical
        arguments, so it must be deterministic.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
