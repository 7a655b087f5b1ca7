"""Installs the pure-Python package (Triton kernels and the PyTorch path)."""
from setuptools import find_packages, setup

setup(
    name="mona_kernels",
    version="0.1.0",
    description="Fused GPU kernels for the Mona vision adapter",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mona_kernels", "mona_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "plot": ["matplotlib"]},
)
