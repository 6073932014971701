"""From a trained model to videos: :class:`Pipeline` (load a model folder or a ``walt fit`` checkpoint, generate)
and :class:`CascadePipeline` (a base model, then super-resolution stages)."""

from walt.pipeline.files import (
    describe_pipeline,
    load_cascade,
    load_model,
    load_tokenizer,
    pipeline_from_description,
    read_checkpoint,
)
from walt.pipeline.parts import ModelFileError
from walt.pipeline.pipeline import CascadePipeline, Pipeline, SuperResolution

__all__ = [
    "CascadePipeline",
    "ModelFileError",
    "Pipeline",
    "SuperResolution",
    "describe_pipeline",
    "load_cascade",
    "load_model",
    "load_tokenizer",
    "pipeline_from_description",
    "read_checkpoint",
]
