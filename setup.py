from setuptools import setup

setup(
    name="improved-diffusion-sag",
    version="0.1.0",
    description="guided-diffusion fork with Self-Attention Guidance (Hong et al., arXiv 2210.00939)",
    packages=["improved_diffusion"],
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "numpy",
        "mpi4py",
        "blobfile",
        "tqdm",
        "Pillow",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "scipy", "mpich"],
        "eval": ["scipy"],
        "plot": ["matplotlib"],
    },
)
