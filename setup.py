from setuptools import find_packages, setup

# torch is pinned loosely: on a CPU-only machine install the CPU build first
# (`pip install torch==2.13.0`, see the README) so that pip does not pull a CUDA build.
setup(
    name="anyms-kernels",
    # one place for the version: anyms/__init__.py (read, not imported: torch may not be installed yet)
    version=__import__("re").search(r'__version__ = "([^"]+)"', open("anyms/__init__.py", encoding="utf-8").read())[1],
    description="Fused region-masked multi-subject cross-attention (AnyMS) for diffusers, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["anyms_kernels", "anyms_kernels.*", "anyms", "anyms.*"]),
    # the trained toy world (a diffusers folder, fp16 safetensors, 7.5 MB): pip install brings it
    package_data={"anyms.toy": ["weights/*.json", "weights/*/*.json", "weights/*/*.txt", "weights/*/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "diffusers": ["diffusers>=0.32", "transformers>=4.45", "accelerate", "safetensors", "einops", "pillow"],
        "viz": ["matplotlib", "pillow"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.0"],
        "bench": ["pytest-benchmark", "matplotlib", "psutil"],
    },
    entry_points={"console_scripts": ["anyms=anyms.cli:main"]},
)
