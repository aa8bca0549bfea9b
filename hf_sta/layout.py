"""Names of the files and folders hf_sta writes next to a model's weights (one place for writer, card, CLI, callback).

```
<output>/
  model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json   (or adapter_model.safetensors)
  config.json, tokenizer files                 copied from the base
  hf_sta_config.yaml                           RECIPE_NAME: the recipe that reproduces this folder
  README.md                                    CARD_NAME: the model card
  heads/<task>.safetensors                     HEADS_FOLDER: task-specific tensors kept per task
  importance/<task>.safetensors                IMPORTANCE_FOLDER: the importance the result depends on
  statistics/<task>.safetensors                STATISTICS_FOLDER: activation statistics the result depends on
```
"""

RECIPE_NAME = "hf_sta_config.yaml"
CARD_NAME = "README.md"
HEADS_FOLDER = "heads"
IMPORTANCE_FOLDER = "importance"
STATISTICS_FOLDER = "statistics"

__all__ = ["CARD_NAME", "HEADS_FOLDER", "IMPORTANCE_FOLDER", "RECIPE_NAME", "STATISTICS_FOLDER"]
