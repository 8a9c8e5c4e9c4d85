"""
Guidance: what turns the network into a guided denoiser.

- ``sag_ops``: the pure SAG maths (key mass, mask, blur, degrade, combine).
- ``attention_capture``: a context manager that hooks one attention op.
- ``sag``: ``SelfAttentionGuidance`` (which block, which steps, which scale).
- ``denoiser``: ``GuidedDenoiser`` (the model with SAG and classifier
  guidance as one function of ``(x_t, t)``) and the times of the discrete
  samplers.

May import: the network (``unet``), the diffusion maths
(``gaussian_diffusion``) and ``errors``; nothing of sampling runs or the
command line.
"""
