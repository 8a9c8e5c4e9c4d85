"""
The checkpoints OpenAI published for guided-diffusion (July 2021) and
improved-diffusion (March 2021), by name (file name without ``.pt``), with
the release folder each lives in under :data:`DEFAULT_BASE_URL`.
"""

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion"

GUIDED_DIFFUSION = "jul-2021"
IMPROVED_DIFFUSION = "march-2021"

PUBLISHED_CHECKPOINTS = {
    **{
        name: GUIDED_DIFFUSION
        for name in (
            "64x64_diffusion",
            "64x64_classifier",
            "128x128_diffusion",
            "128x128_classifier",
            "256x256_diffusion",
            "256x256_diffusion_uncond",
            "256x256_classifier",
            "512x512_diffusion",
            "512x512_classifier",
            "64_256_upsampler",
            "128_512_upsampler",
            "lsun_bedroom",
            "lsun_cat",
            "lsun_horse",
            "lsun_horse_nodropout",
        )
    },
    **{
        name: IMPROVED_DIFFUSION
        for name in (
            "imagenet64_uncond_100M_1500K",
            "cifar10_uncond_50M_500K",
            "imagenet64_cond_270M_250K",
            "upsample_cond_500K",
            "lsun_uncond_100M_1200K_bs128",
            "lsun_uncond_100M_2400K_bs64",
            "imagenet64_uncond_vlb_100M_1500K",
            "cifar10_uncond_vlb_50M_500K",
        )
    },
}


def checkpoint_url(name, base_url=DEFAULT_BASE_URL):
    """The download address of a published checkpoint (KeyError if unknown)."""
    return f"{base_url.rstrip('/')}/{PUBLISHED_CHECKPOINTS[name]}/{name}.pt"
