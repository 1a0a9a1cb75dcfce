"""omnijax: Omni-Diffusion in JAX/Flax for TPU pods (install: pip install -e '.[test]')."""

from setuptools import find_packages, setup

# Tested ranges: the floor is what CI runs (jax 0.10.2 is the newest that installs on Python 3.11);
# the ceiling stops at the next minor release we have not tested.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.14",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "numpy>=2.0,<3",
    "pyyaml>=6.0",
    "safetensors>=0.5",
    "tokenizers>=0.21",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",  # tfds needs it to build custom datasets but does not declare it
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "jiwer>=3.0,<5",  # word error rate (omnijax.eval.wer)
    # the speech encoder's fbank (omnijax.model.speech_frontend); FunASR's own fbank here
    "kaldi-native-fbank>=1.23,<2",
    # continuous speech input from audio files: reading wav/flac/... (omnijax.data.audio) and
    # polyphase resampling to 16 kHz
    "soundfile>=0.12",
    "scipy>=1.11",
    "rapidfuzz>=3",  # word edit distances (omnijax.eval.chance); jiwer depends on it too
]
EXTRAS = {
    # libtpu for ahead-of-time compilation against real TPU topologies (runs on a CPU host).
    "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    # gs:// workdirs: etils.epath (checkpoint metadata, metrics, configs, plots) reads and writes
    # Cloud Storage through gcsfs; TensorBoard events go through google-cloud-storage.
    "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
    # torch 2.13.0 is the CPU build this machine installs in seconds; unpinned pulls a CUDA build.
    # funasr: the speech encoder's reference (tests/model/test_speech_*), pinned to the version
    # parity was measured against. Its declared dependencies (modelscope, hydra, jieba, umap...)
    # cost about a minute and 0.4 GB more than the tests need (`pip install --no-deps funasr`
    # with kaldiio, omegaconf, librosa suffices), which setup.py cannot express.
    "parity": ["torch==2.13.0", "transformers>=4.51,<6", "funasr==1.4.16"],
}
EXTRAS["test"] = ["pytest>=8"] + EXTRAS["tpu"] + EXTRAS["parity"]

setup(
    name="omnijax",
    version="0.1.0",
    description="Omni-Diffusion (masked discrete diffusion, any-to-any) in JAX/Flax NNX for TPU pods",
    python_requires=">=3.11",
    packages=find_packages(include=["omnijax", "omnijax.*"]),
    include_package_data=True,
    package_data={"omnijax.kernels": ["tuning.json"]},  # measured attention block sizes
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["omnijax=omnijax.cli:main"]},
)
