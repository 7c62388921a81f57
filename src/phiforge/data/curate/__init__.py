"""Data curation: edu-value labels and classifier, heuristic filters, dedup, decontamination, executors."""
