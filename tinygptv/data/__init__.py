"""Data: prompt encoding, templates, image processing, dataset readers and the synthetic world."""
