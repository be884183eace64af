"""Recipes: whole training pipelines, from nothing to a finished model.

* :mod:`tinygptv.recipes.micro`: the micro TinyGPT-V on the synthetic shapes world. It first
  pretrains its own tiny frozen parts (tokenizer, language model, vision encoder + Q-Former), then
  runs the paper's four stages on them through :mod:`tinygptv.train`. Its output is the built-in
  model (``tinygptv/assets/tinygptv-micro-shapes``).
* :mod:`tinygptv.recipes.world_tokenizer`: the small byte-level BPE tokenizer of the shapes world.
* :mod:`tinygptv.recipes.pretrain`: the two pretraining phases of the frozen parts.
* :mod:`tinygptv.recipes.ablate`: the micro recipe with each of TinyGPT-V's modules removed (Table 4).

Importing these modules does no work.
"""
