"""
The guided denoiser: the model with Self-Attention Guidance and classifier
guidance as one function of ``(x_t, t)`` that every sampler calls.

A sampler hands the denoiser its own notion of time through a *times*
object: :class:`DiffusionTimes` for the ancestral and DDIM samplers (t is
the step index of a GaussianDiffusion, respaced or not), and
``improved_diffusion.sampling.samplers.SolverTimes`` for DPM-Solver++ (t is
continuous). A times object says what the network is given, how x_0 and
the noise turn into each other at t, and how many evaluations of the run
come after t (the SAG window, ``--guide_start``). The denoiser knows
nothing else about the sampler, and the samplers know nothing about SAG.
"""

import dataclasses
from typing import Optional

import torch as th
import torch.nn.functional as F

from . import sag_ops
from ..gaussian_diffusion import ModelMeanType, ModelVarType, _extract_into_tensor


@dataclasses.dataclass(frozen=True)
class Denoised:
    """
    One evaluation of the guided denoiser.

    :param output: the prediction in the model's own output format (eps or
        x_0, then the first pass's variance channels for learned-sigma
        models): what a GaussianDiffusion step consumes.
    :param eps: the (SAG-guided) noise prediction.
    :param pictures: on SAG-guided evaluations, the first pass's x_0
        prediction ('pred_xstart'), the mask ('sag_mask'), the blurred
        prediction ('sag_degraded_xstart') and the second pass's x_0
        ('second_pass_xstart'); None otherwise.
    """

    output: th.Tensor
    eps: th.Tensor
    pictures: Optional[dict] = None

    def as_model(self):
        """A model that returns this prediction whatever it is asked (upstream's idiom)."""
        return lambda *_args, **_kwargs: self.output


class ClassifierGuidance:
    """
    The gradient of a noisy classifier's log p(y | x_t), scaled.

    Called as ``guidance(x, t, y=...)`` it is guided-diffusion's ``cond_fn``
    (gradient times scale), which the ancestral and DDIM steps apply in their
    published forms (``condition_mean``, ``condition_score``).
    """

    def __init__(self, classifier, scale):
        self.classifier = classifier
        self.scale = scale

    def gradient(self, x, t, y=None, **_):
        """d/dx log p(y | x_t) at the classifier's time t."""
        assert y is not None
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0]

    def __call__(self, x, t, y=None, **kwargs):
        return self.gradient(x, t, y, **kwargs) * self.scale


class DiffusionTimes:
    """
    The time of a GaussianDiffusion's samplers: t is a batch of step indices
    of `diffusion` (respaced or not). The arithmetic is the diffusion's own,
    so guided steps match the published sampler bit for bit.
    """

    def __init__(self, diffusion):
        self.diffusion = diffusion
        # SpacedDiffusion maps its indices to the base model's timesteps by
        # wrapping the model; wrapping the identity gives the mapping alone.
        wrap = getattr(diffusion, "_wrap_model", None)
        self._to_model = wrap(lambda _x, ts: ts) if wrap is not None else (lambda _x, ts: ts)

    def model_time(self, t):
        return self._to_model(None, self.diffusion._scale_timesteps(t))

    def x0_from_eps(self, x, t, eps):
        return self.diffusion._predict_xstart_from_eps(x, t, eps)

    def eps_from_x0(self, x, t, x0):
        return self.diffusion._predict_eps_from_xstart(x, t, x0)

    def renoise(self, x0, t, eps):
        """x_t made from x_0 with `eps` as the noise."""
        return self.diffusion.q_sample(x0, t, noise=eps)

    def sigma(self, t):
        """The noise level sqrt(1 - alpha_bar) of each index, [N x 1 x 1 x 1]."""
        return _extract_into_tensor(self.diffusion.sqrt_one_minus_alphas_cumprod, t, (len(t), 1, 1, 1))

    def steps_left(self, t):
        """How many steps come after this one: the published index i."""
        return int(t[0])


class GuidedDenoiser:
    """
    The model with Self-Attention Guidance (and classifier guidance), built
    once per run.

    ``denoiser(x, t, times, model_kwargs)`` -> :class:`Denoised`. When SAG
    applies at t (``sag.applies(times.steps_left(t))``), it is the published
    SAG step (docs/sag.md, steps 2-8):

    1. the first pass runs the model on x_t while the chosen block's
       attention is captured; its x_0 prediction (clamped to [-1, 1] with
       `clip_denoised`) and eps;
    2. x_0 is blurred where the attention mask is 1 and re-noised to t with
       the first pass's eps (``times.renoise``);
    3. the second pass runs the model on it at the same t, same kwargs;
    4. eps_guided = eps_bar + scale * (eps - eps_bar).

    The variance channels of a learned-sigma model stay the first pass's.
    Otherwise it is one plain model call.

    :param model: the network, ``model(x, t, **model_kwargs)``.
    :param learn_sigma: the model also outputs variance channels.
    :param predict_xstart: the model predicts x_0 instead of eps.
    :param clip_denoised: clamp x_0 predictions to [-1, 1].
    :param sag: None or a :class:`~improved_diffusion.guidance.sag.SelfAttentionGuidance`.
    :param classifier: None or a :class:`ClassifierGuidance`.
    """

    def __init__(self, model, *, learn_sigma, predict_xstart=False, clip_denoised=True,
                 sag=None, classifier=None):
        self.model = model
        self.learn_sigma = learn_sigma
        self.predict_xstart = predict_xstart
        self.clip_denoised = clip_denoised
        self.sag = sag
        self.classifier = classifier

    @classmethod
    def for_diffusion(cls, model, diffusion, **kwargs):
        """A denoiser for a model trained with `diffusion` (its output kind read from it)."""
        if diffusion.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError("the guided denoiser needs a model that predicts eps or x_0, not x_{t-1}")
        learn_sigma = diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        return cls(model, learn_sigma=learn_sigma,
                   predict_xstart=diffusion.model_mean_type == ModelMeanType.START_X, **kwargs)

    def guides(self, steps_left):
        """Whether SAG applies to an evaluation with `steps_left` evaluations after it."""
        return self.sag is not None and self.sag.applies(steps_left)

    def __call__(self, x, t, times, model_kwargs=None):
        kwargs = model_kwargs or {}
        model_t = times.model_time(t)
        if not self.guides(times.steps_left(t)):
            output = self.model(x, model_t, **kwargs)
            mean_part = self._mean_part(output, x)
            if self.predict_xstart:
                return Denoised(output, times.eps_from_x0(x, t, self._clip(mean_part)))
            return Denoised(output, mean_part)

        with self.sag.capture() as attention:
            output = self.model(x, model_t, **kwargs)
        x0, eps = self._x0_and_eps(self._mean_part(output, x), x, t, times)
        mask = self.sag.mask(attention, x.shape)
        degraded = sag_ops.degrade(x0, mask, self.sag.blur_sigma, separable_blur=self.sag.separable_blur)
        x_hat = times.renoise(degraded, t, eps)
        output_hat = self.model(x_hat, model_t, **kwargs)
        x0_hat, eps_hat = self._x0_and_eps(self._mean_part(output_hat, x), x_hat, t, times)
        eps_guided = sag_ops.combine(eps, eps_hat, self.sag.scale)

        # Back to the model's output format: x_0 for x_0 models, then the
        # first pass's variance channels.
        guided = times.x0_from_eps(x, t, eps_guided) if self.predict_xstart else eps_guided
        if self.learn_sigma:
            guided = th.cat([guided, output[:, x.shape[1]:]], dim=1)
        pictures = {"pred_xstart": x0, "sag_mask": mask, "sag_degraded_xstart": degraded,
                    "second_pass_xstart": x0_hat}
        return Denoised(guided, eps_guided, pictures)

    def guided_eps(self, x, t, times, model_kwargs=None):
        """
        The noise prediction with SAG and then classifier guidance in noise
        form, ``eps - scale * sigma_t * grad log p(y | x_t)`` (the official
        DPM-Solver's classifier guidance), for samplers that take guidance
        through eps: (eps, pictures or None).
        """
        kwargs = model_kwargs or {}
        grad = None
        if self.classifier is not None:
            grad = self.classifier.gradient(x, times.model_time(t), **kwargs)
        denoised = self(x, t, times, kwargs)
        eps = denoised.eps
        if grad is not None:
            eps = eps - self.classifier.scale * times.sigma(t) * grad
        return eps, denoised.pictures

    def _mean_part(self, output, x):
        if self.learn_sigma:
            channels = x.shape[1]
            assert output.shape[1] == 2 * channels, (output.shape, x.shape)
            return output[:, :channels]
        return output

    def _x0_and_eps(self, mean_part, x, t, times):
        """(x_0 prediction, clamped with clip_denoised; eps) from the model's mean output."""
        if self.predict_xstart:
            x0 = self._clip(mean_part)
            return x0, times.eps_from_x0(x, t, x0)
        return self._clip(times.x0_from_eps(x, t, mean_part)), mean_part

    def _clip(self, x0):
        return x0.clamp(-1, 1) if self.clip_denoised else x0
