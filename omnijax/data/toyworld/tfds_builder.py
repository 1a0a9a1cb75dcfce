"""The toy world as a `tensorflow_datasets` builder, readable by Grain without TensorFlow.

    import omnijax.data.toyworld.tfds_builder  # registers "omnijax_toy_world"
    source = tfds.data_source("omnijax_toy_world/tiny", split="train", data_dir=DIR)
    grain.MapDataset.source(source)            # dicts: tokens, response_start, task_id

Features are plain integer Tensors (`features.Image` and `tfds.load` need TensorFlow). The
tokenizer and vocabulary layout travel in the dataset's metadata, so a reader can decode text.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from omnijax.data.record import Sample
from omnijax.data.tasks import TASKS
from omnijax.data.toyworld.world import SPLITS, ToyWorldSpec, build


@dataclasses.dataclass(eq=False)
class ToyWorldConfig(tfds.core.BuilderConfig):
  spec: ToyWorldSpec = ToyWorldSpec(n=2000)


class OmnijaxToyWorld(tfds.core.GeneratorBasedBuilder):
  """Toy-world samples of every task, templated and tokenized, with train and heldout splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: record format 1 fields as integer tensors."}
  BUILDER_CONFIGS = [
      ToyWorldConfig(name="default", description="2000 scenes, 16x16 images",
                     spec=ToyWorldSpec(n=2000)),
      ToyWorldConfig(name="tiny", description="64 scenes, 8x8 images (tests)",
                     spec=ToyWorldSpec(n=64, grid=8)),
  ]

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # tfds defaults to TFRecord, whose writer needs TensorFlow; ArrayRecord is what Grain reads.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "response_start": tfds.features.Tensor(shape=(), dtype=np.int32),
        "task_id": tfds.features.Tensor(shape=(), dtype=np.int32),
    })
    return self.dataset_info_from_configs(features=features, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    world = build(self.builder_config.spec)
    self.info.metadata.update(vocab=world.spec.vocab.describe(), tokenizer=world.tokenizer.to_str(),
                              toyworld=dataclasses.asdict(world.spec))
    return {split: self._generate_examples(world.samples[split]) for split in SPLITS}

  def _generate_examples(self, samples):
    for key, sample in enumerate(samples):
      yield key, {"tokens": sample.tokens, "response_start": np.int32(sample.response_start),
                  "task_id": np.int32(TASKS.index(sample.task))}


def to_sample(example: dict) -> Sample:
  """A decoded tfds example -> the `Sample` it was written from."""
  return Sample(TASKS[int(example["task_id"])], np.asarray(example["tokens"], np.int32),
                int(example["response_start"]))
