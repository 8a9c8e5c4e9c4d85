from setuptools import find_packages, setup

setup(
    name="improved-diffusion-sag",
    version="0.1.0",
    description="guided-diffusion fork with Self-Attention Guidance (Hong et al., arXiv 2210.00939)",
    packages=find_packages(include=["improved_diffusion", "improved_diffusion.*", "evaluations"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "numpy",
        "mpi4py",
        "blobfile",
        "tqdm",
        "Pillow",
        "scipy",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "mpich", "matplotlib"],
        "eval": [],  # kept for old install lines: scipy is a runtime dependency now
        "plot": ["matplotlib"],
    },
)
