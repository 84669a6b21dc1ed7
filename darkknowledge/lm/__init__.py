"""Language-model specifics: causal LMs from Hugging Face ``transformers``, tokenised text corpora,
and the lazy and sparse forms of a model's per-token distribution (``targets``)."""
