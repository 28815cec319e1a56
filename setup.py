"""keras_cdl: Coded Deep Learning (CDL) for TensorFlow/Keras."""

import setuptools

setuptools.setup(
    name="keras_cdl",
    version="0.1.0",
    description=("Coded Deep Learning for Keras: probabilistic quantization "
                 "with analytic soft gradients, entropy-constrained training "
                 "and entropy-coded storage."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_cdl", "keras_cdl.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow~=2.14.1",
        "tensorflow-compression==2.14.1",
        "tensorflow-model-optimization~=0.8.0",
        "absl-py",
        "numpy<2",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "benchmarks": ["matplotlib"],
    },
    entry_points={"console_scripts": ["keras-cdl=keras_cdl.cli:main"]},
    license="Apache-2.0",
)
