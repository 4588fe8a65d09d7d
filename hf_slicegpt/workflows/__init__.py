"""What users run end to end: text sources (data, augment), loading models, perplexity and zero-shot evaluation,
recovery fine-tuning (rft), and the slicing pipeline behind ``hf-slicegpt slice`` (pipeline)."""
