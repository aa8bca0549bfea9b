"""Fusion of trained models that do not share a base: Adaptive Knowledge Fusion (AKF) and a simple-fusion baseline.

```python
from hf_sta.fusion import FusedMultiTaskModel, FusionTrainingArguments, train_fusion

model = FusedMultiTaskModel.from_pretrained({"sentiment": "path/to/minilm-sentiment", "topic": "path/to/smollm-lora"},
                                            label_words={"topic": ["business", "sports"]})
train_fusion(model, {"sentiment": train_a, "topic": train_b}, FusionTrainingArguments(max_steps=300))
model(texts=["..."], task="sentiment").logits
```
"""

from .config import FusionConfig
from .loading import load_transformers_source, load_transformers_sources
from .model import FusedMultiTaskModel, FusedOutput
from .modules import AdaptiveKnowledgeFusion, ConcatFusion
from .sources import FusionSource, ModuleSource, SourceOutput, TransformersSource
from .training import (
    FusionTrainingArguments,
    FusionTrainingResult,
    MultiTaskSampler,
    encode_dataset,
    evaluate_fusion,
    train_fusion,
)

__all__ = [
    "AdaptiveKnowledgeFusion",
    "ConcatFusion",
    "FusedMultiTaskModel",
    "FusedOutput",
    "FusionConfig",
    "FusionSource",
    "FusionTrainingArguments",
    "FusionTrainingResult",
    "ModuleSource",
    "MultiTaskSampler",
    "SourceOutput",
    "TransformersSource",
    "encode_dataset",
    "evaluate_fusion",
    "load_transformers_source",
    "load_transformers_sources",
    "train_fusion",
]
